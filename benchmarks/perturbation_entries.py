"""One leaderboard entry: a family trained on the split (or a baseline fitted on its training
cells), its prediction of the test perturbations from the task's controls, and the one
evaluation every entry gets (``evaluate_perturbation``: cell-eval beside the training-mean
baseline and the ceiling, energy distance, the seeds' scoreboards)."""

from __future__ import annotations

from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

from .perturbation_task import Task

# What the leaderboard changes from a family's defaults, before the user's --set: ST with the
# recipe of the held-out benchmarks; the VAE of the scGen baseline as in papalexi2021 (unknown cell type and generic perturbation learned, so it
# can meet held-out cell types and targets); the others train with their own defaults.
RECIPES: dict[str, list[str]] = {
    "vae": ["model.batch_conditioning=false", "model.n_latent=16", "train.max_steps=1500",
            "data.batch_size=256"],
    "st": [
        "data.set_size=32", "data.sets_per_batch=8", "model.hidden=128", "model.depth=2",
        "model.heads=4", "model.basal=train", "model.cell_type_dropout=0.2",
        "model.perturbation_dropout=0.1", "model.shift_path=true", "train.max_steps=3000",
        "train.ema=true", "train.ema_decay=0.995", "optim.lr=1e-3", "optim.warmup_steps=100",
    ],
}  # fmt: skip
LOOP_QUIET = ["train.checkpoint_every=0", "train.eval_every=0"]


def family_overrides(name: str, user: list[str]) -> list[str]:
    """``--set FAMILY:KEY=VALUE`` entries of one family, without the prefix."""
    prefix = f"{name}:"
    return [o.removeprefix(prefix) for o in user if o.startswith(prefix)]


def train_entry(
    family, task: Task, run: Path, seed: int, user: list[str], reuse: bool, tracking_uri: str
) -> dict:
    from latentcell.families.train import load_family_config, train_family

    if reuse and (run / "final" / "model_config.json").exists():
        return {"run_dir": str(run), "reused": True}
    overrides = [
        f"data.path={task.store}", f"split.file={task.split_file}", f"run.dir={run}",
        f"run.root={run.parent}", f"train.seed={seed}", "train.progress=false",
        f"tracking.uri={tracking_uri}",
        *(LOOP_QUIET if family.stage else []), *RECIPES.get(family.name, []),
        *family_overrides(family.name, user),
    ]  # fmt: skip
    summary = train_family(family, load_family_config(family, None, overrides))
    _reset_accelerate()
    return summary


VAE_RUN = "vae_for_latent_baseline"  # under <out>/runs: the VAE of the latent baseline and
# of the families that work in a VAE's latent space (``Family.vae``)


def latent_vae(task: Task, out: Path, user: list[str], reuse: bool, tracking_uri: str) -> Path:
    """The count VAE of the scGen baseline and of the ``Family.vae`` families, trained on the
    split's training cells only (``--set vae:KEY=VALUE`` applies)."""
    from latentcell.families import family_named

    run = out / "runs" / VAE_RUN
    train_entry(family_named("vae"), task, run, 0, user, reuse, tracking_uri)
    return run


def family_variants(family, vae: Path | None) -> list[tuple[str, tuple[str, ...]]]:
    """(entry label, ``--set`` overrides) of the family's default and each of its
    ``variants`` (e.g. ``latent-delta`` and ``latent-delta-absolute``), ``vae.run`` added for
    a family that works in a VAE's latent space."""
    out = []
    for variant, overrides in ((None, ()), *family.variants):
        label = family.name if variant is None else f"{family.name}-{variant}"
        extra = (f"vae.run={vae}",) if family.vae else ()
        out.append((label, tuple(f"{family.name}:{o}" for o in (*overrides, *extra))))
    return out


def _reset_accelerate() -> None:
    """Several trainings in one process: a fresh Accelerate state for each."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def family_predictor(family, run: Path, mode: str | None):
    from latentcell.inference.predict import PredictOptions

    # the fallbacks a run learned (generic perturbation, unknown cell type) are used where
    # needed and recorded in the prediction; a run that learned none refuses such labels
    if family.fallbacks:
        options = PredictOptions(unseen="generic", unseen_cell_type="unknown", mode=mode)
    else:
        options = PredictOptions(mode=mode)
    return family.load("predictor")(run, options)


def baseline_predictor(name: str, task: Task, vae_run: Path | None):
    from latentcell.evaluation.perturbation_baselines import fit_baseline

    genes = [str(g) for g in task.controls.var_names]
    return fit_baseline(
        name, task.train, genes, task.pert_col, task.control, task.cell_type_col,
        source="the split's training cells", vae_run=str(vae_run) if vae_run else None,
        basal="train", batch_col=task.batch_col,
    )  # fmt: skip


def reused_evaluation(folder: Path) -> dict | None:
    """A finished evaluation of this entry and seed (``--reuse``), or None."""
    import json

    path = folder / "eval" / "summary.json"
    return {"summary": json.loads(path.read_text()), "reused": True} if path.exists() else None


def predict_and_evaluate(predictor, task: Task, folder: Path, seed: int, n_cells: int) -> dict:
    """The entry's prediction file and its evaluation summary; a predictor that refuses the
    task (e.g. a perturbation it has no parameters for) is recorded with its one line."""
    from latentcell.data_pipelines.atomic import write_h5ad_atomic
    from latentcell.evaluation.perturbation import evaluate_perturbation
    from latentcell.inference.predict import PopulationRequest, predict_population

    request = PopulationRequest(
        task.perturbations, n_cells, task.pert_col, task.control, task.cell_type_col, seed
    )
    try:
        pred = predict_population(predictor, task.controls, request, "the task's controls")
    except DataValidationError as err:
        return {"refused": str(err)}
    folder.mkdir(parents=True, exist_ok=True)
    write_h5ad_atomic(pred, folder / "prediction.h5ad")
    summary = evaluate_perturbation(
        pred, task.real, task.train, folder / "eval", task.pert_col, task.control
    )
    return {"summary": summary, "fallbacks": pred.uns["latentcell"].get("fallbacks", {})}
