"""Perturbation encoders: shapes, gene sums, external files, unseen labels, reload, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.perturbation_encoders import (
    ExternalGeneEncoder,
    GeneTableEncoder,
    OneHotEncoder,
    PerturbationEncoderConfig,
    encode_labels,
    load_gene_vectors,
    make_perturbation_encoder,
    perturbation_genes,
    split_genes,
)

LABELS = ["non-targeting", "STAT1", "IRF1", "STAT1+IRF1", "MYC"]
FILE_GENES = ["TP53", "STAT1", "IRF1", "MYC", "GATA1"]  # more genes than the labels use
D_FILE = 6


def _file_vectors() -> np.ndarray:
    # float32 values written with repr round-trip exactly through text files.
    return np.random.default_rng(0).normal(size=(len(FILE_GENES), D_FILE)).astype(np.float32)


def _write_text(path, delimiter: str, header: str | None) -> str:
    lines = [] if header is None else [header]
    for gene, row in zip(FILE_GENES, _file_vectors(), strict=True):
        lines.append(delimiter.join([gene, *(repr(float(v)) for v in row)]))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _write_npz(path) -> str:
    np.savez(path, genes=np.array(FILE_GENES, dtype=str), vectors=_file_vectors())
    return str(path)


def _write_pt(path) -> str:
    torch.save({"genes": FILE_GENES, "vectors": torch.from_numpy(_file_vectors())}, path)
    return str(path)


def _encoder(kind: str, tmp_path, labels=LABELS, dim: int = 8):
    torch.manual_seed(0)
    file = _write_npz(tmp_path / "emb.npz") if kind == "external" else ""
    config = PerturbationEncoderConfig(kind=kind, dim=dim, embeddings_file=file)
    return make_perturbation_encoder(config, labels)


def _vector(gene: str) -> torch.Tensor:
    return torch.from_numpy(_file_vectors()[FILE_GENES.index(gene)])


def test_config_validation():
    assert PerturbationEncoderConfig().kind == "onehot"
    bad = [
        {"kind": "mlp"},
        {"dim": 0},
        {"kind": "external"},  # no file
        {"kind": "gene_table", "embeddings_file": "x.npz"},  # file would be ignored
        {"combo_separator": " "},
        {"control_label": "ctrl+x"},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            PerturbationEncoderConfig(**kw)


def test_split_genes_and_gene_vocabulary():
    assert split_genes("non-targeting") == ()
    assert split_genes("STAT1 + IRF1") == ("STAT1", "IRF1")
    assert split_genes("STAT1+ctrl", control_label="ctrl") == ("STAT1",)  # GEARS-style singles
    assert split_genes("A+A") == ("A",)
    assert split_genes("A_B", separator="_") == ("A", "B")
    assert perturbation_genes(LABELS) == ("STAT1", "IRF1", "MYC")  # first appearance
    with pytest.raises(DataValidationError, match="empty gene name"):
        split_genes("STAT1+")


@pytest.mark.parametrize("kind", ["onehot", "gene_table", "external"])
def test_shapes_and_labels(kind, tmp_path):
    enc = _encoder(kind, tmp_path)
    codes = torch.tensor([0, 3, 4, 3])
    out = enc(codes)
    assert out.shape == (4, 8) and out.dtype == torch.float32
    assert enc.labels == tuple(LABELS) and enc.dim == 8
    assert torch.equal(enc.encode(["MYC", "non-targeting"]), torch.tensor([4, 0]))


def test_bad_vocabulary():
    config = PerturbationEncoderConfig(kind="gene_table")
    for labels in (["A", "A"], ["A", ""], [], "STAT1", ["non-targeting"]):
        with pytest.raises(DataValidationError):
            make_perturbation_encoder(config, labels)


def test_onehot_distinct_and_no_unseen_labels(tmp_path):
    enc = _encoder("onehot", tmp_path)
    assert isinstance(enc, OneHotEncoder)
    out = enc(torch.arange(len(LABELS)))
    assert torch.cdist(out, out).add(torch.eye(len(LABELS))).min() > 0  # all rows distinct
    assert torch.equal(enc.features(torch.tensor([2])), torch.eye(len(LABELS))[2:3])
    assert torch.equal(enc.extend(["IRF1"]), torch.tensor([2]))
    with pytest.raises(DataValidationError, match="'IRF1\\+MYC'"):
        enc.extend(["IRF1+MYC"])  # a combination is just a label: unseen means unknown
    assert enc.labels == tuple(LABELS)


def test_encode_labels():
    assert torch.equal(encode_labels(LABELS, ["MYC", "STAT1"]), torch.tensor([4, 1]))
    assert encode_labels(LABELS, ["MYC", "STAT1"]).dtype == torch.long
    with pytest.raises(DataValidationError) as err:
        encode_labels(LABELS, ["MYC", "BRCA1", "EGFR"])
    message = str(err.value)
    assert "2 label(s)" in message and "'BRCA1'" in message and "'EGFR'" in message
    assert "Fix:" in message and "extend" in message


def test_gene_table_sums_genes_exactly(tmp_path):
    enc = _encoder("gene_table", tmp_path)
    assert isinstance(enc, GeneTableEncoder) and enc.genes == ("STAT1", "IRF1", "MYC")
    with torch.no_grad():
        e = {label: enc(enc.encode([label]))[0] for label in LABELS}
    assert torch.equal(e["STAT1+IRF1"], e["STAT1"] + e["IRF1"])
    assert torch.equal(e["non-targeting"], torch.zeros(8))
    assert torch.equal(e["STAT1"], enc.table.weight[0].detach())
    multi_hot = enc.features(enc.encode(["STAT1+IRF1", "non-targeting"]))
    assert torch.equal(multi_hot, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gene_table_extends_to_unseen_combinations(tmp_path):
    enc = _encoder("gene_table", tmp_path)
    keys = {k: v.shape for k, v in enc.state_dict().items()}
    codes = enc.extend(["MYC+IRF1+STAT1", "STAT1", "IRF1+STAT1", "MYC+IRF1+STAT1"])
    assert codes.tolist() == [5, 1, 6, 5]
    assert enc.labels[5:] == ("MYC+IRF1+STAT1", "IRF1+STAT1")
    with torch.no_grad():
        out = enc(codes)
        w = enc.table.weight
    assert torch.equal(out[2], enc(enc.encode(["STAT1+IRF1"]))[0])  # order does not matter
    torch.testing.assert_close(out[0], w[0] + w[1] + w[2])
    assert {k: v.shape for k, v in enc.state_dict().items()} == keys  # no new state
    with pytest.raises(DataValidationError) as err:
        enc.extend(["MYC+GATA1"])
    assert "'GATA1'" in str(err.value) and "external" in str(err.value)
    assert len(enc.labels) == 7  # a failed extension adds nothing


@pytest.mark.parametrize(
    "fmt", ["csv_header", "csv_pandas_index", "tsv_no_header", "csv_gz", "npz", "pt"]
)
def test_external_vectors_from_files(fmt, tmp_path):
    if fmt == "csv_header":
        file = _write_text(tmp_path / "e.csv", ",", "gene," + ",".join(f"d{i}" for i in range(6)))
    elif fmt == "csv_pandas_index":
        file = _write_text(tmp_path / "e.csv", ",", "," + ",".join(str(i) for i in range(6)))
    elif fmt == "tsv_no_header":
        file = _write_text(tmp_path / "e.tsv", "\t", None)
    elif fmt == "csv_gz":
        import gzip

        plain = _write_text(tmp_path / "plain.csv", ",", None)
        file = str(tmp_path / "e.csv.gz")
        with open(plain, "rb") as src, gzip.open(file, "wb") as dst:
            dst.write(src.read())
    elif fmt == "npz":
        file = _write_npz(tmp_path / "e.npz")
    else:
        file = _write_pt(tmp_path / "e.pt")
    config = PerturbationEncoderConfig(kind="external", dim=D_FILE, embeddings_file=file)
    enc = make_perturbation_encoder(config, LABELS)
    assert isinstance(enc, ExternalGeneEncoder)
    assert enc.gene_vectors.shape == (3, D_FILE)  # only the perturbed genes are kept
    codes = enc.encode(LABELS)
    feats = enc.features(codes)
    assert torch.equal(feats[0], torch.zeros(D_FILE))
    assert torch.equal(feats[1], _vector("STAT1"))
    assert torch.equal(feats[3], _vector("STAT1") + _vector("IRF1"))
    with torch.no_grad():  # identity projection: the output is the summed vectors
        enc.projection.weight.copy_(torch.eye(D_FILE))
        enc.projection.bias.zero_()
        assert torch.equal(enc(codes), feats)


def test_external_extension_uses_stored_genes_only(tmp_path):
    enc = _encoder("external", tmp_path)
    code = enc.extend(["MYC+STAT1"])
    assert torch.equal(enc.features(code)[0], _vector("MYC") + _vector("STAT1"))
    with pytest.raises(DataValidationError, match="'GATA1'"):
        enc.extend(["GATA1"])  # in the file, but not stored: the encoder never read it


def test_missing_gene_is_an_error_naming_file_genes_and_fix(tmp_path):
    file = _write_npz(tmp_path / "esm2.npz")
    labels = ["non-targeting", "STAT1", "BRCA1+STAT1", *(f"G{i}" for i in range(7))]
    config = PerturbationEncoderConfig(kind="external", embeddings_file=file)
    with pytest.raises(DataValidationError) as err:
        make_perturbation_encoder(config, labels)
    message = str(err.value)
    assert file in message and "'BRCA1'" in message
    assert "8 of 9 perturbed genes" in message and "and 3 more" in message
    assert "Fix:" in message and "control_label" in message
    # A control written differently from control_label is a missing gene, not a zero vector.
    with pytest.raises(DataValidationError, match="'control'"):
        make_perturbation_encoder(config, ["control", "STAT1"])


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("dup.csv", "STAT1,1,2\nSTAT1,3,4\n", "listed twice"),
        ("ragged.csv", "STAT1,1,2\nIRF1,3\n", "2 fields, expected 3"),
        ("nan.csv", "STAT1,1,nan\n", "NaN or inf"),
        ("word.csv", "gene,a,b\nSTAT1,1,x\n", "non-numeric"),
        ("empty.tsv", "", "empty"),
        ("vectors.json", "{}", "unknown format"),
    ],
)
def test_malformed_files(name, text, problem, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataValidationError, match=problem) as err:
        load_gene_vectors(path, ["STAT1"])
    assert str(path) in str(err.value)
    with pytest.raises(DataValidationError, match="no such file"):
        load_gene_vectors(tmp_path / "absent.npz", ["STAT1"])


def test_npz_object_genes_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, genes=np.array(["STAT1", None], dtype=object), vectors=np.zeros((2, 3)))
    with pytest.raises(DataValidationError, match="object array"):
        load_gene_vectors(path, ["STAT1"])


@pytest.mark.parametrize("kind", ["onehot", "gene_table", "external"])
def test_state_dict_round_trip_without_the_file(kind, tmp_path):
    enc = _encoder(kind, tmp_path)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))  # "trained" weights, not the seeded init
    codes = torch.tensor([0, 1, 2, 3, 4, 3])
    expected = enc(codes).detach()
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    if kind == "external":
        assert "gene_vectors" in state and "gene_index" not in state
        (tmp_path / "emb.npz").unlink()  # reloading must not need the file
    torch.manual_seed(123)
    rebuilt = make_perturbation_encoder(enc.config, list(enc.labels), state_dict=state)
    assert rebuilt.labels == enc.labels
    assert torch.equal(rebuilt(codes), expected)
    if kind != "onehot":  # extended labels rebuild too: they add no genes and no state
        enc.extend(["MYC+IRF1"])
        again = make_perturbation_encoder(enc.config, list(enc.labels), state_dict=state)
        assert torch.equal(again(enc.encode(["MYC+IRF1"])), enc(enc.encode(["MYC+IRF1"])))


@pytest.mark.parametrize("kind", ["onehot", "gene_table", "external"])
def test_gradients_reach_learned_parts_only(kind, tmp_path):
    enc = _encoder(kind, tmp_path)
    frozen = enc.gene_vectors.clone() if kind == "external" else None
    optimizer = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc(torch.tensor([1, 3, 4])).pow(2).sum().backward()
    params = dict(enc.named_parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    optimizer.step()
    if kind == "external":
        assert set(params) == {"projection.weight", "projection.bias"}
        assert not enc.gene_vectors.requires_grad and enc.gene_vectors.grad is None
        assert torch.equal(enc.gene_vectors, frozen)
