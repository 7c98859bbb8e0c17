"""The latent-shift stage's cells: the split's cells in memory, how unpaired control and
perturbed cells are paired for training, and the held-out metrics.

Pairing (``pair_cells``): each perturbed cell gets a control of its (cell type, batch), else
of its cell type (cells of a type without controls stay unpaired and are counted).

- ``random``: a control drawn uniformly, with replacement (the set sampler's matching rule).
  The predictor then sees pairs whose difference is the effect plus the spread of two
  independent cells, so it learns the conditional mean: predicted cells collapse towards it.
- ``ot``: an optimal-transport match (``scipy.optimize.linear_sum_assignment`` on squared
  embedding distances) between the perturbed cells of one (perturbation, cell type, batch)
  and an equal number of controls drawn from the pool without replacement, in chunks of at
  most ``ot_max`` cells (cubic cost). Equal sizes keep the pairs' mean shift an unbiased
  estimate (a rectangular match would pick the controls nearest the perturbed cells and
  shrink every shift); the match pairs each cell with a control like it, so the predictor
  learns a map that keeps the cells' spread. Measured (``benchmarks/latent_shift_pairing``):
  equal mean error, 0.74x (synthetic) and 0.40x (Papalexi) the energy distance of random.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TrainingCells", "decoder", "pair_cells", "validation_metrics"]


def pair_cells(emb, is_control, pert, cell_type, batch, rule, rng, ot_max=512):
    """(perturbed rows, control rows, unpaired count) by ``rule`` (module docstring)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    by_batch: dict[tuple, list[int]] = {}
    by_type: dict[str, list[int]] = {}
    for row in np.flatnonzero(is_control):
        by_batch.setdefault((cell_type[row], batch[row]), []).append(row)
        by_type.setdefault(cell_type[row], []).append(row)
    pert_rows, ctrl_rows, unpaired = [], [], 0
    blocks: dict[tuple, list[int]] = {}
    for row in np.flatnonzero(~is_control):
        blocks.setdefault((pert[row], cell_type[row], batch[row]), []).append(row)
    for (_, t, b), rows in sorted(blocks.items()):
        pool = np.asarray(by_batch.get((t, b)) or by_type.get(t) or [], np.int64)
        rows = np.asarray(rows, np.int64)
        if not len(pool):
            unpaired += len(rows)
            continue
        if rule == "random":
            pert_rows.append(rows)
            ctrl_rows.append(rng.choice(pool, size=len(rows)))
            continue
        size = min(ot_max, len(pool))
        shuffled = rng.permutation(rows)
        for chunk in np.array_split(shuffled, -(-len(rows) // size)):
            cand = rng.choice(pool, size=len(chunk), replace=False)
            r, c = linear_sum_assignment(cdist(emb[chunk], emb[cand], "sqeuclidean"))
            pert_rows.append(chunk[r])
            ctrl_rows.append(cand[c])
    if not pert_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), unpaired
    return np.concatenate(pert_rows), np.concatenate(ctrl_rows), unpaired


class TrainingCells:
    """The split's training and validation cells in memory: log1p expression and each row's
    perturbation, cell type and batch ("" where the store has no such column)."""

    def __init__(self, reader, rows: np.ndarray) -> None:
        from latentcell.data_pipelines.split_files import read_cells
        from latentcell.inference.predict import _dense, log1p_normalize

        meta = reader.meta
        cells = read_cells(reader, rows)
        counts = _dense(cells.X)
        self.x = log1p_normalize(counts, counts.sum(1))
        columns = {}
        for role in ("perturbation", "cell_type", "batch"):
            name = meta.roles.get(role)
            obs = cells.obs[name].astype(str).to_numpy() if name else None
            columns[role] = obs if obs is not None else np.full(cells.n_obs, "")
        self.pert, self.cell_type, self.batch = columns.values()
        self.is_control = self.pert == meta.control_label
        self.rows = np.unique(rows)  # read_cells keeps store order

    def pairs(self, emb: np.ndarray, rows: np.ndarray, model, rng):
        """``pair_cells`` on ``rows`` by ``model.pairing`` / ``model.ot_max``: (perturbed
        rows, control rows, unpaired count)."""
        p, c, unpaired = pair_cells(
            emb[rows], self.is_control[rows], self.pert[rows], self.cell_type[rows],
            self.batch[rows], model.pairing, rng, model.ot_max,
        )  # fmt: skip
        return rows[p], rows[c], unpaired


def decoder(run, bridge, mode: str):
    """pred embeddings (+ the controls' embeddings and log1p) -> log1p genes, means only."""
    if bridge is not None:
        return lambda pred, ctrl_emb, control: bridge.decode_numpy(pred)
    return lambda pred, ctrl_emb, control: run.pca.decode(pred, ctrl_emb, control, mode)


def validation_metrics(run, cells, emb, is_train, trained, decode) -> dict[str, float]:
    """Held-out groups (perturbation, cell type, batch) with a trained descriptor: the mean
    prediction from the group's controls vs the real mean (``latent_shift_stage``, step 4). The
    controls: the group's held-out ones, else its training ones, else its cell type's."""
    from latentcell.models.perturbation_labels import untrained_parts

    d = run.descriptors
    val = ~is_train & ~cells.is_control
    keys = zip(cells.pert[val], cells.cell_type[val], cells.batch[val], strict=True)
    scores: dict[str, list[float]] = {k: [] for k in ("mse_mean", "mse_mean_control",
                                                      "energy", "pearson_delta")}  # fmt: skip
    skipped = 0
    for label, t, b in sorted(set(keys)):
        in_type = (cells.cell_type == t) & cells.is_control
        in_batch = in_type & (cells.batch == b)
        ctrl = next((r for r in (in_batch & ~is_train, in_batch, in_type) if r.any()), None)
        if ctrl is None or untrained_parts(label, trained, d.kind, d.separator, d.control_label):
            skipped += 1
            continue
        real = val & (cells.pert == label) & (cells.cell_type == t) & (cells.batch == b)
        pred, target = run.shift(emb[ctrl], label), emb[real].mean(0)
        scores["mse_mean"].append(float(((pred.mean(0) - target) ** 2).mean()))
        scores["mse_mean_control"].append(float(((emb[ctrl].mean(0) - target) ** 2).mean()))
        scores["energy"].append(_energy(pred, emb[real]))
        base = cells.x[ctrl].mean(0)
        shift_pred = decode(pred, emb[ctrl], cells.x[ctrl]).mean(0) - base
        shift_real = cells.x[real].mean(0) - base
        if shift_pred.std() > 1e-12 and shift_real.std() > 1e-12:
            scores["pearson_delta"].append(float(np.corrcoef(shift_pred, shift_real)[0, 1]))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    return out | {"groups": float(len(scores["mse_mean"])), "skipped_groups": float(skipped)}


def _energy(a: np.ndarray, b: np.ndarray, n: int = 256) -> float:
    """Energy distance between two point clouds (first ``n`` rows of each): it sees the
    spread of the predicted cells, which a mean comparison cannot."""
    from scipy.spatial.distance import cdist

    a, b = a[:n], b[:n]
    return float(2 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean())
