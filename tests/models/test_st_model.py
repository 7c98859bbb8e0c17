"""The ST set model: permutation equivariance, padding invariance, the identity start, both
conditioning modes, and learning a known per-perturbation shift of a population."""

from __future__ import annotations

import pytest
import torch

from latentcell.models.perturbation_encoders import PerturbationEncoderConfig
from latentcell.models.set_losses import SetLossConfig, set_loss
from latentcell.models.st_model import STConfig, STModel, cell_features

LABELS = ("non-targeting", "A", "B", "A+B")


def model(conditioning: str = "joint", **kw) -> STModel:
    torch.manual_seed(0)
    config = STConfig(
        n_features=6, perturbation_labels=LABELS, conditioning=conditioning, hidden=32,
        depth=2, heads=4, **kw,
    )  # fmt: skip
    m = STModel(config)
    torch.nn.init.normal_(m.head.weight, std=0.1)  # a non-trivial output for the invariances
    return m.eval()


@pytest.mark.parametrize("conditioning", ["joint", "cross", "sum"])
def test_permuting_the_controls_permutes_the_prediction(conditioning):
    m = model(conditioning)
    control = torch.rand(2, 7, 6)
    pert = torch.tensor([1, 3])
    perm = torch.randperm(7)
    with torch.no_grad():
        out = m.predict(control, pert)
        out_perm = m.predict(control[:, perm], pert)
    torch.testing.assert_close(out_perm, out[:, perm])


@pytest.mark.parametrize("conditioning", ["joint", "cross", "sum"])
def test_padded_cells_do_not_change_the_real_ones(conditioning):
    m = model(conditioning)
    control = torch.rand(1, 5, 6)
    padded = torch.cat([control, 100 * torch.rand(1, 3, 6)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        alone = m.predict(control, torch.tensor([2]))
        with_pad = m.predict(padded, torch.tensor([2]), mask)
    torch.testing.assert_close(with_pad[:, :5], alone)


def test_untrained_model_is_the_control_identity_and_perturbations_differ():
    torch.manual_seed(0)
    m = STModel(STConfig(n_features=6, perturbation_labels=LABELS, hidden=32, depth=1))
    control = torch.rand(2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(m.predict(control, torch.tensor([0, 1])), control)
    m = model()
    with torch.no_grad():
        a = m.predict(control, torch.tensor([1, 1]))
        b = m.predict(control, torch.tensor([2, 2]))
    assert (a - b).abs().max() > 1e-3
    assert (a >= 0).all()  # gene space: ReLU keeps expression non-negative


def test_covariates_are_required_when_configured():
    m = model(n_cell_types=2, n_batches=3)
    control = torch.rand(1, 4, 6)
    with pytest.raises(ValueError, match="cell_type"):
        m.predict(control, torch.tensor([1]), batch=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        m.predict(control, torch.tensor([1]), cell_type=torch.tensor([0]))
    out = m.predict(
        control, torch.tensor([1]), cell_type=torch.tensor([1]),
        batch=torch.tensor([[0, 1, 2, 0]]),
    )  # fmt: skip
    assert out.shape == (1, 4, 6)


def test_config_errors():
    with pytest.raises(ValueError, match="conditioning"):
        STConfig(n_features=3, perturbation_labels=LABELS, conditioning="film")
    with pytest.raises(ValueError, match="space"):
        STConfig(n_features=3, perturbation_labels=LABELS, space="pixels")
    with pytest.raises(ValueError, match="divisible"):
        STConfig(n_features=3, perturbation_labels=LABELS, hidden=30, heads=4)
    with pytest.raises(ValueError, match="at least one"):
        STConfig(n_features=3, perturbation_labels=())


def _pair_batch(shift: torch.Tensor, pert: torch.Tensor, generator: torch.Generator) -> dict:
    """Controls ~ N(2, 0.3); perturbed = fresh cells shifted by ``shift[pert]`` (features)."""
    n, s, f = len(pert), 16, shift.shape[1]
    control = 2 + 0.3 * torch.randn(n, s, f, generator=generator)
    target = 2 + 0.3 * torch.randn(n, s, f, generator=generator) + shift[pert][:, None]
    return {
        "control": {"features": control},
        "perturbed": {"features": target},
        "perturbation": pert,
        "cell_type": torch.zeros(n, dtype=torch.long),
        "is_pad": torch.zeros(n, dtype=torch.bool),
    }


@pytest.mark.parametrize("conditioning", ["joint", "cross", "sum"])
def test_learns_a_known_shift_per_perturbation(conditioning):
    """Energy distance + mean term on sets: the predicted set means move to the true shifts."""
    torch.manual_seed(0)
    shift = torch.tensor([[0.0] * 6, [1.0, -1.0, 0, 0, 0.5, 0], [0, 0, 1.0, 1.0, 0, -0.5]])
    config = STConfig(
        n_features=6, perturbation_labels=("non-targeting", "A", "B"), hidden=32, depth=2,
        conditioning=conditioning, perturbation=PerturbationEncoderConfig(kind="gene_table"),
        loss=SetLossConfig(kind="energy", mean_weight=1.0),
    )  # fmt: skip
    m = STModel(config)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        out = m(_pair_batch(shift, torch.randint(0, 3, (8,), generator=g), g))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    test = _pair_batch(shift, torch.tensor([1, 2]), g)
    with torch.no_grad():
        pred = m.predict(test["control"]["features"], test["perturbation"])
    delta = pred.mean(1) - test["control"]["features"].mean(1)
    assert (delta - shift[1:]).abs().max() < 0.25, delta
    # a distribution, not a copy of the mean: predicted cells keep the controls' spread
    assert pred.std(1).mean() > 0.15


def test_cell_features_normalize_counts_like_the_vae():
    counts = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 2.0, 0.0]]])
    feats = cell_features({"X": counts, "library_size": counts.sum(-1)}, "gene")
    expected = torch.log1p(counts / counts.sum(-1, keepdim=True) * 1e4)
    torch.testing.assert_close(feats, expected)
    with pytest.raises(KeyError, match="features"):
        cell_features({"X": counts, "library_size": counts.sum(-1)}, "latent")


def test_train_basal_replaces_the_set_mean_by_the_training_control_mean():
    """basal='train': the prediction depends on the control set only through its cells'
    deviations from the set mean, which is replaced by the stored training-control mean;
    an untrained model returns exactly x - mean_set(x) + control_mean[cell type]."""
    torch.manual_seed(0)
    config = STConfig(
        n_features=6, perturbation_labels=LABELS, hidden=32, depth=1, basal="train",
        n_cell_types=2, space="latent",
    )  # fmt: skip
    m = STModel(config).eval()
    control = torch.rand(2, 5, 6)
    with pytest.raises(ValueError, match="no training-control mean"):
        m.predict(control, torch.tensor([1, 2]), cell_type=torch.tensor([0, 1]))
    means = torch.tensor([[1.0] * 6, [3.0] * 6])
    m.set_control_mean(means)
    ct = torch.tensor([0, 1])
    with torch.no_grad():
        out = m.predict(control, torch.tensor([1, 2]), cell_type=ct)
        expected = control - control.mean(1, keepdim=True) + means[ct][:, None]
        torch.testing.assert_close(out, expected)
        torch.nn.init.normal_(m.head.weight, std=0.1)
        shifted = m.predict(control + 0.7, torch.tensor([1, 2]), cell_type=ct)
        torch.testing.assert_close(shifted, m.predict(control, torch.tensor([1, 2]), cell_type=ct))
        mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
        padded = control.clone()
        padded[:, 3:] = 50.0
        torch.testing.assert_close(
            m.predict(padded, torch.tensor([1, 2]), mask, cell_type=ct)[:, :3],
            m.predict(control[:, :3], torch.tensor([1, 2]), cell_type=ct),
        )
    assert "control_mean" in m.state_dict()  # saved with the weights
    with pytest.raises(ValueError, match="basal must be one of"):
        STConfig(n_features=6, perturbation_labels=LABELS, basal="median")
    with pytest.raises(ValueError, match="only used with basal='train'"):
        model().set_control_mean(means)


GENES = ("A", "B", "C", "g3", "g4", "g5")  # feature names: the labels' genes are measured


def target_model(**kw) -> STModel:
    torch.manual_seed(0)
    config = STConfig(
        n_features=6, perturbation_labels=("non-targeting", "A", "B", "A+B", "C"), hidden=32,
        depth=1, target_effect=True, feature_genes=GENES,
        perturbation=PerturbationEncoderConfig(kind="gene_table"), **kw,
    )  # fmt: skip
    return STModel(config).eval()


def test_target_effect_scales_only_the_perturbed_genes():
    m = target_model()
    control = 1 + torch.rand(4, 5, 6)
    codes = torch.tensor([0, 1, 3, 4])  # control, A, A+B, C
    with torch.no_grad():
        torch.testing.assert_close(m.predict(control, codes), control)  # theta = 0: identity
        m.target_log_factor.fill_(torch.log(torch.tensor(0.5)))
        out = m.predict(control, codes)
    factor = torch.ones(4, 6)
    factor[1, 0] = factor[2, 0] = factor[2, 1] = factor[3, 2] = 0.5
    torch.testing.assert_close(out, control * factor[:, None])
    # a new combination of known genes gets its own target row; explicit rows override
    code = m.extend(["C+A"])
    assert m.target_mask[code].tolist() == [[1.0, 0, 1.0, 0, 0, 0]]
    rows = m.target_rows(["g4", "not-a-gene"])
    assert rows.tolist() == [[0, 0, 0, 0, 1.0, 0], [0.0] * 6]
    with torch.no_grad():
        out = m.predict(control[:2], torch.tensor([1, 1]), targets=rows)
    torch.testing.assert_close(out[0, :, 4], 0.5 * control[0, :, 4])
    torch.testing.assert_close(out[1], control[1])


def test_target_effect_and_dropout_config_errors():
    with pytest.raises(ValueError, match="space='gene'"):
        STConfig(n_features=6, perturbation_labels=LABELS, target_effect=True, space="latent",
                 feature_genes=GENES)  # fmt: skip
    with pytest.raises(ValueError, match="feature_genes"):
        STConfig(n_features=6, perturbation_labels=LABELS, target_effect=True)
    with pytest.raises(ValueError, match="perturbation_dropout"):
        STConfig(n_features=6, perturbation_labels=LABELS, perturbation_dropout=1.0)
    with pytest.raises(ValueError, match="perturbation_dropout"):
        model().predict(torch.rand(1, 3, 6), torch.tensor([1]), generic=torch.tensor([True]))


def test_generic_perturbation_and_target_effect_predict_an_unseen_target():
    """Training data: every perturbation shifts g3/g4 by the same amount and halves its own
    target. Trained on A and B only (with perturbation dropout), the model predicts C, which
    it never saw, through the generic vector plus the target effect: the shared shift and
    C halved."""
    torch.manual_seed(0)
    m = target_model(perturbation_dropout=0.3, loss=SetLossConfig(kind="energy", mean_weight=1.0))
    m.train()
    common = torch.tensor([0, 0, 0, 0.8, -0.6, 0])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def batch(codes):
        control = 2 + 0.3 * torch.randn(len(codes), 16, 6, generator=g)
        target = 2 + 0.3 * torch.randn(len(codes), 16, 6, generator=g)
        target = (target + common * (codes > 0)[:, None, None]) * torch.exp(
            torch.log(torch.tensor(0.5)) * m.target_mask[codes]
        )[:, None]
        return {
            "control": {"features": control}, "perturbed": {"features": target},
            "perturbation": codes, "cell_type": torch.zeros(len(codes), dtype=torch.long),
            "is_pad": torch.zeros(len(codes), dtype=torch.bool),
        }  # fmt: skip

    for _ in range(600):
        out = m(batch(torch.randint(0, 3, (8,), generator=g)))  # non-targeting, A, B
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m.eval()
    assert abs(torch.exp(m.target_log_factor).item() - 0.5) < 0.05
    control = 2 + 0.3 * torch.randn(1, 64, 6, generator=g)
    with torch.no_grad():
        pred = m.predict(
            control, torch.tensor([0]), generic=torch.tensor([True]), targets=m.target_rows(["C"])
        )
    delta = pred.mean(1)[0] - control.mean(1)[0]
    expected = common.clone()
    expected[2] = -0.5 * control[0, :, 2].mean()
    assert (delta - expected).abs().max() < 0.2, (delta, expected)


def test_basal_train_recentres_per_cell_type_without_cell_type_conditioning():
    """basal='train' keeps one training-control mean per cell type even when the model is not
    cell-type-conditioned: two types with different means each get their own, never the
    pooled mean (which moved both to the average of the two)."""
    torch.manual_seed(0)
    config = STConfig(
        n_features=6, perturbation_labels=LABELS, hidden=32, depth=1, basal="train",
        basal_cell_types=2, space="latent",
    )  # fmt: skip
    m = STModel(config).eval()
    assert m.cell_type is None and m.uses_cell_type
    means = torch.tensor([[0.5] * 6, [4.0] * 6])
    m.set_control_mean(means)
    control = torch.rand(2, 5, 6) + torch.tensor([0.5, 4.0])[:, None, None]
    ct = torch.tensor([0, 1])
    with torch.no_grad():
        out = m.predict(control, torch.tensor([1, 2]), cell_type=ct)
    torch.testing.assert_close(out, control - control.mean(1, keepdim=True) + means[ct][:, None])
    with pytest.raises(ValueError, match="per cell type"):
        m.predict(control, torch.tensor([1, 2]))


def held_out_type_model(**kw) -> STModel:
    """Cell-type-conditioned, basal='train', two cell types of which only type 0 trained
    (type 1: no training sets, no training controls), with the unknown cell type."""
    torch.manual_seed(0)
    config = STConfig(
        n_features=6, perturbation_labels=LABELS, hidden=32, depth=1, basal="train",
        n_cell_types=2, basal_cell_types=2, space="latent", cell_type_dropout=0.3, **kw,
    )  # fmt: skip
    m = STModel(config)
    torch.nn.init.normal_(m.head.weight, std=0.1)
    m.set_control_mean(torch.tensor([[1.0] * 6, [float("nan")] * 6]))
    m.set_trained_cell_types(torch.tensor([True, False]))
    return m.eval()


def test_unknown_cell_type_replaces_the_row_and_the_basal():
    """The unknown route never reads the cell type's row or its training-control mean: the
    learned unknown vector and the set's own mean stand in, explicitly (``unknown``)."""
    m = held_out_type_model()
    assert m.known_cell_types().tolist() == [True, False] and m.takes_unknown
    control = 1 + torch.rand(1, 5, 6)
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="no training-control mean"):
        m.predict(control, one, cell_type=one)  # type 1, not routed: refused
    with torch.no_grad():
        routed = m.predict(control, one, cell_type=one, unknown=torch.tensor([True]))
        m.cell_type.weight[1].normal_()  # the untrained row: not read
        m.control_mean[1] = 100.0  # nor a mean for it
        again = m.predict(control, one, cell_type=one, unknown=torch.tensor([True]))
        as_type_0 = m.predict(
            control, one, cell_type=torch.tensor([0]), unknown=torch.tensor([True])
        )
        m.unknown_cell_type.normal_()
        other = m.predict(control, one, cell_type=one, unknown=torch.tensor([True]))
    torch.testing.assert_close(again, routed)
    torch.testing.assert_close(as_type_0, routed)  # the code is a placeholder
    assert (other - routed).abs().max() > 1e-3  # the unknown vector is what is used
    with torch.no_grad():  # an untrained model: the control identity on the set's own mean
        torch.nn.init.zeros_(m.head.weight)
        identity = m.predict(control, one, cell_type=one, unknown=torch.tensor([True]))
    torch.testing.assert_close(identity, control)
    plain = model(n_cell_types=2)
    with pytest.raises(ValueError, match="cell_type_dropout"):
        plain.predict(control, one, cell_type=one, unknown=torch.tensor([True]))


def _typed_batch(cell_type: list[int], generator: torch.Generator) -> dict:
    n = len(cell_type)
    return {
        "control": {"features": 1 + torch.rand(n, 8, 6, generator=generator)},
        "perturbed": {"features": 2 + torch.rand(n, 8, 6, generator=generator)},
        "perturbation": torch.ones(n, dtype=torch.long),
        "cell_type": torch.tensor(cell_type),
        "is_pad": torch.zeros(n, dtype=torch.bool),
    }


def test_training_never_reaches_an_untrained_cell_type_row():
    """Training trains the unknown vector on a share of the sets (cell_type_dropout) and the
    held-out type's row not at all; validation routes the held-out type's sets through the
    unknown cell type; a model without one refuses them instead of using the random row."""
    g = torch.Generator().manual_seed(0)
    m = held_out_type_model().train()
    torch.manual_seed(1)
    m(_typed_batch([0] * 16, g)).loss.backward()
    assert m.unknown_cell_type.grad.abs().sum() > 0
    assert m.cell_type.weight.grad[0].abs().sum() > 0
    assert m.cell_type.weight.grad[1].abs().sum() == 0
    m.eval()
    batch = _typed_batch([1, 1], g)
    control = batch["control"]["features"]
    with torch.no_grad():
        loss = m(batch).loss  # no NaN mean, no random row: the unknown route
        pred = m.predict(control, batch["perturbation"], cell_type=batch["cell_type"],
                         unknown=torch.tensor([True, True]))  # fmt: skip
        terms = set_loss(m.config.loss, pred, batch["perturbed"]["features"], control)
    torch.testing.assert_close(loss, terms["total"].mean())
    plain = model(n_cell_types=2)
    plain.set_trained_cell_types(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"cell types \[1\] have no trained"):
        plain(_typed_batch([0, 1], g))


def test_cell_type_dropout_config_errors():
    with pytest.raises(ValueError, match="cell_type_dropout must be in"):
        STConfig(n_features=6, perturbation_labels=LABELS, n_cell_types=2, cell_type_dropout=1.0)
    with pytest.raises(ValueError, match="needs cell-type conditioning"):
        STConfig(n_features=6, perturbation_labels=LABELS, cell_type_dropout=0.2)
    with pytest.raises(ValueError, match="expected 2 cell types"):
        model(n_cell_types=2).set_trained_cell_types(torch.tensor([True]))


def test_shift_path_alone_carries_each_perturbations_population_shift():
    """The shift path by itself (every other tensor frozen at its zero-head start but the
    perturbation table) moves each set's mean to its perturbation's shift: one shift per
    set, the same for all its cells, so the cells keep their spread."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    shift = torch.zeros(4, 40)
    for p in range(1, 4):
        # within (-1.5, 2): the controls sit at 2 and gene-space predictions pass a ReLU
        shift[p, torch.randperm(40, generator=g)[:8]] = 3.5 * torch.rand(8, generator=g) - 1.5
    config = STConfig(
        n_features=40,
        perturbation_labels=("non-targeting", "A", "B", "C"),
        hidden=32,
        depth=1,
        shift_path=True,
    )
    m = STModel(config)
    train = [m.shift_norm.weight, m.shift_norm.bias, m.shift_head.weight, m.shift_head.bias,
             m.perturbation.table.weight]  # fmt: skip
    for p in m.parameters():
        p.requires_grad_(any(p is t for t in train))
    opt = torch.optim.Adam(train, lr=1e-2)
    for _ in range(200):
        out = m(_pair_batch(shift, torch.randint(0, 4, (8,), generator=g), g))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    test = _pair_batch(shift, torch.tensor([1, 2, 3]), g)
    with torch.no_grad():
        pred = m.predict(test["control"]["features"], test["perturbation"])
    control = test["control"]["features"]
    delta = pred.mean(1) - control.mean(1)
    assert (delta - shift[1:]).abs().max() < 0.3, delta
    torch.testing.assert_close(pred - pred.mean(1, keepdim=True),
                               control - control.mean(1, keepdim=True))  # fmt: skip


def test_cards_without_shift_path_load_without_it():
    """Runs saved before the shift path have no key in their card and no tensors for it."""
    import dataclasses

    config = STConfig(n_features=6, perturbation_labels=LABELS, shift_path=True)
    assert STModel(config).state_dict()["shift_head.weight"].abs().sum() == 0  # identity start
    card = dataclasses.asdict(config)
    del card["shift_path"]
    old = STConfig.from_dict(card)
    assert not old.shift_path
    assert not any(k.startswith("shift_") for k in STModel(old).state_dict())
