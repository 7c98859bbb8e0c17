"""A bundle directory: ``metadata.json`` plus one ONNX file per component, checked on load.

Layout (written by ``latentcell export``)::

    BUNDLE/metadata.json      format, versions, source run (MLflow run id), genes in order,
                              normalization, the VAE's likelihood, generation settings
                              (conditions, noise schedule or flow, latent scale, library-size
                              model) and/or prediction settings (perturbation vocabulary, ...),
                              each component's inputs/outputs and measured parity, and the
                              sha256 of every file
    BUNDLE/<component>.onnx   vae_encoder, vae_decoder, denoiser, set_model (what the run has)

Each ONNX file also carries the metadata (without the per-file hashes and parity, which are
known only after every file is written) in its ``metadata_props``, so a model file copied
out of its bundle still says what it is, and a file swapped in from another bundle is caught
even when someone rewrote the hashes. Loading refuses a bundle whose files do not hash to
the recorded sha256 (a tampered or half-copied file), and every call validates its inputs'
names, dtypes and shapes before onnxruntime sees them.

metadata.json is data that anyone who can write the directory can edit, so the loader
trusts none of it: every field it reads is type-checked (:func:`check_metadata`), and every
file name in it (``components.<name>.file``, the keys of ``files``) goes through
``safe_paths.resolve_inside``. A name with ``..``, an absolute path, or a symlink that leads
out of the bundle is refused with one error naming metadata.json and the field, before
anything is hashed or loaded.
"""

from __future__ import annotations

import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.safe_paths import resolve_inside
from latentcell.inference.gene_names import GeneNames

__all__ = [
    "FORMAT",
    "Bundle",
    "check_metadata",
    "component_props",
    "embedded_metadata",
    "session_options",
]

FORMAT = "latentcell.onnx-bundle"
FORMAT_VERSION = 1
METADATA = "metadata.json"
PROPS_KEY = "latentcell.metadata"
COMPONENT_KEY = "latentcell.component"
COMPONENTS = ("vae_encoder", "vae_decoder", "denoiser", "conditioner", "denoiser_shared",
              "denoiser_body", "set_model", "delta_predictor", "control_encoder",
              "rna_encoder", "protein_encoder", "rna_decoder", "protein_decoder")  # fmt: skip
_DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


def embedded_metadata(metadata: dict) -> dict:
    """The part of the metadata every model file carries (no hashes, no parity)."""
    return {k: v for k, v in metadata.items() if k not in ("components", "files")}


def component_props(metadata: dict, component: str) -> dict[str, str]:
    return {COMPONENT_KEY: component, PROPS_KEY: json.dumps(embedded_metadata(metadata))}


def session_options(threads: int | None = None, spinning: bool = True):
    """onnxruntime settings that matter here: ``threads`` intra-op threads (default: the
    machine's cores, capped at 8), one inter-op thread, sequential execution and every
    graph optimization. ``spinning=False`` stops idle pool threads from busy-waiting, for a
    service sharing its cores with other work; it costs throughput (2-core VM, 2 threads,
    50-step generation, interleaved medians: batch 256 in 606 ms without spinning against
    492 ms with it; batch 1 the same, 19 ms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(8, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


SMALL_ROWS = 8  # calls this small run on a one-thread session (see ``Component``)
# onnxruntime fuses the DiT's first residual add (a per-token position embedding, broadcast
# over rows) and LayerNorm into SkipLayerNormalization, whose broadcast path is slow: without
# that fusion the shared denoiser runs a step at batch 256 in 2.50 ms against 2.72 ms (one
# thread, alternated; outputs equal to 3e-7).
DISABLED_OPTIMIZERS = {
    name: ["SkipLayerNormFusion"] for name in ("denoiser", "denoiser_shared", "denoiser_body")
}


class Component:
    """One ONNX model whose ``run`` checks every input against the recorded spec.

    Calls of at most ``SMALL_ROWS`` rows go to a second, single-threaded session (created on
    the first such call) when the main one has several threads. Why: a thread pool costs
    more than it saves on tiny calls, and a batch-1 sampler makes 50 of them. On the 2-core
    VM a 50-step batch-1 generation took 18-39 ms with the 2-thread session against 15-17 ms
    on one thread, while batch 256 needs both threads.
    """

    def __init__(self, bundle: Path, name: str, spec: dict, session, small=None) -> None:
        self.bundle, self.name, self.spec, self.session = bundle, name, spec, session
        self.input_names = tuple(spec["inputs"])
        self.output_names = tuple(spec["outputs"])
        self._small_factory, self._small = small, None
        self.threads = session.get_session_options().intra_op_num_threads

    def _session_for(self, rows: int):
        if self._small_factory is None or rows > SMALL_ROWS:
            return self.session
        if self._small is None:
            self._small = self._small_factory()
        return self._small

    def _check(self, name: str, value) -> np.ndarray:
        want = self.spec["inputs"][name]
        field = f"{self.name}.{name}"
        if not isinstance(value, np.ndarray):
            raise DataValidationError(
                self.bundle, field, f"got {type(value).__name__}", "pass a numpy array"
            )
        if value.dtype != _DTYPES[want["dtype"]]:
            raise DataValidationError(
                self.bundle, field, f"dtype {value.dtype}, expected {want['dtype']}",
                f"convert with .astype(np.{want['dtype']})",
            )  # fmt: skip
        shape = want["shape"]
        fixed_ok = all(
            isinstance(d, str) or d == got for d, got in zip(shape, value.shape, strict=False)
        )
        if value.ndim != len(shape) or not fixed_ok:
            raise DataValidationError(
                self.bundle, field, f"shape {tuple(value.shape)}, expected {tuple(shape)}",
                "named dimensions may be any size; the numbers must match",
            )  # fmt: skip
        return value

    def run_one_thread(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """``run`` on the one-thread session whatever the size: for a call between
        ``run_many`` calls, where the main session's pool threads would go on spinning for
        the cores the pieces need (priming a sampler's conditioning on them slowed the 50
        steps after it by 17%)."""
        return self._run(self._session_for(0), self._feeds(inputs))

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = self._feeds(inputs)
        return self._run(self._session_for(len(feeds[self.input_names[0]])), feeds)

    def _feeds(self, inputs: dict) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise DataValidationError(
                self.bundle, self.name, f"inputs {sorted(inputs)}",
                f"pass exactly {list(self.input_names)}",
            )  # fmt: skip
        return {n: self._check(n, inputs[n]) for n in self.input_names}

    def _run(self, session, feeds: dict) -> dict[str, np.ndarray]:
        return dict(
            zip(self.output_names, session.run(list(self.output_names), feeds), strict=True)
        )


_POOLS: dict[int, ThreadPoolExecutor] = {}


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size for the whole runtime (ONNX calls side by side, NB draws)."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, "latentcell-runtime")
    return pool


def run_many(calls: list[tuple[Component, dict]], threads: int) -> list[dict[str, np.ndarray]]:
    """Several calls at once, each on its component's one-thread session, on up to
    ``threads`` threads (onnxruntime releases the GIL): the first on this thread, the rest
    on a pool. Why: a DiT's ops are too small for intra-op threads to split well; a
    batch-256 denoiser step as two 128-row pieces side by side took 1.6 ms against 1.75 ms
    on two intra-op threads, and a guided step's two halves side by side save a dispatch."""
    if threads < 2 or len(calls) < 2:
        return [component.run_one_thread(**inputs) for component, inputs in calls]
    pool = thread_pool(threads - 1)
    rest = [pool.submit(lambda c=c, i=i: c.run_one_thread(**i)) for c, i in calls[1:]]
    first = calls[0][0].run_one_thread(**calls[0][1])
    return [first] + [future.result() for future in rest]


class Bundle:
    """A loaded, verified bundle: ``metadata`` and one ``Component`` per ONNX file."""

    def __init__(self, path: Path, metadata: dict, components: dict[str, Component]) -> None:
        self.path, self.metadata, self.components = path, metadata, components

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def genes(self) -> list[str]:
        return list(self.metadata["genes"]["gene_key"])

    @functools.cached_property
    def gene_names(self) -> GeneNames:
        """The genes' keys, ids and symbols, matched and written by ``gene_names.py``."""
        return GeneNames.from_table(self.metadata["genes"])

    def __getitem__(self, name: str) -> Component:
        if name not in self.components:
            raise DataValidationError(
                self.path, "components", f"this {self.kind} bundle has no {name}",
                f"it has {sorted(self.components)}; export a run that trained one",
            )  # fmt: skip
        return self.components[name]

    def __contains__(self, name: str) -> bool:
        return name in self.components

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort

        path = Path(path)
        metadata = read_metadata(path)
        files = verify_files(path, metadata)
        options = session_options(threads, spinning)
        providers = ["CPUExecutionProvider"]
        components = {}
        for name, spec in metadata["components"].items():
            file = files[spec["file"]]
            disabled = DISABLED_OPTIMIZERS.get(name, [])
            session = ort.InferenceSession(
                str(file), options, providers=providers, disabled_optimizers=disabled
            )
            small = None
            if options.intra_op_num_threads > 1:
                small = functools.partial(
                    ort.InferenceSession,
                    str(file),
                    session_options(1, spinning),
                    providers=providers,
                    disabled_optimizers=disabled,
                )
            embedded = session.get_modelmeta().custom_metadata_map
            try:
                props = json.loads(embedded.get(PROPS_KEY, "null"))
            except (ValueError, RecursionError):
                props = None
            if embedded.get(COMPONENT_KEY) != name or props != embedded_metadata(metadata):
                raise DataValidationError(
                    file, "metadata_props", "the model's embedded metadata differs from "
                    "metadata.json: the file comes from another export",
                    "re-export the run (latentcell export) instead of mixing bundle files",
                )  # fmt: skip
            components[name] = Component(path, name, spec, session, small)
        return cls(path, metadata, components)


def read_metadata(path: Path) -> dict:
    """metadata.json, parsed and type-checked (:func:`check_metadata`)."""
    file = path / METADATA
    if not file.is_file():
        raise DataValidationError(
            path, METADATA, "not a bundle directory (no metadata.json)",
            "pass the --out directory of `latentcell export`",
        )  # fmt: skip
    try:
        metadata = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        problem = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataValidationError(file, "json", problem, "re-export the run") from err
    if not isinstance(metadata, dict):
        raise DataValidationError(
            file, "json", f"a JSON {type(metadata).__name__}, not an object", "re-export the run"
        )
    if metadata.get("format") != FORMAT:
        raise DataValidationError(
            file, "format", f"{_short(metadata.get('format'))} is not {FORMAT!r}",
            "re-export the run",
        )  # fmt: skip
    if type(metadata.get("format_version")) is not int or metadata["format_version"] != (
        FORMAT_VERSION
    ):
        raise DataValidationError(
            file, "format_version",
            f"version {_short(metadata.get('format_version'))}, this runtime reads "
            f"{FORMAT_VERSION}", "export again with this latentcell version",
        )  # fmt: skip
    check_metadata(metadata, file)
    return metadata


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(source: Path, field: str, value: object, what: str) -> DataValidationError:
    return DataValidationError(
        source, field, f"{_short(value)} is not {what}",
        "metadata.json was edited or damaged: restore it or re-export the run",
    )  # fmt: skip


def check_metadata(metadata: dict, source: Path) -> None:
    """Every field the loader and ``Bundle`` read has the type the exporter writes, so a
    damaged or hostile metadata.json is one ``DataValidationError`` naming the field, never
    a KeyError or TypeError later. Types are exact (``True`` is not a dimension). What the
    samplers read is covered by the copy embedded in every ONNX file, which must equal
    metadata.json."""

    def expect(value, kinds: tuple[type, ...], field: str, what: str, nonempty=False):
        if type(value) not in kinds or (nonempty and not value):
            raise _refuse(source, field, value, what)
        return value

    expect(metadata.get("kind"), (str,), "kind", "a string")
    src = expect(metadata.get("source"), (dict,), "source", "an object")
    expect(src.get("run"), (str,), "source.run", "a string")
    genes = expect(metadata.get("genes"), (dict,), "genes", "an object")
    for key in expect(genes.get("gene_key"), (list,), "genes.gene_key", "a list"):
        expect(key, (str,), "genes.gene_key", "a gene key (string)")
    for column in ("gene_id", "gene_symbol"):  # optional ("" where unknown)
        for name in expect(genes.get(column, []), (list,), f"genes.{column}", "a list"):
            expect(name, (str,), f"genes.{column}", 'a gene name (string, "" if unknown)')
    components = expect(metadata.get("components"), (dict,), "components",
                        "a non-empty object", nonempty=True)  # fmt: skip
    for name, spec in components.items():
        field = f"components.{name}"
        if name not in COMPONENTS:
            raise DataValidationError(
                source, field, f"{_short(name)} is not a component this runtime knows",
                f"components are {list(COMPONENTS)}; re-export the run",
            )  # fmt: skip
        expect(spec, (dict,), field, "an object")
        expect(spec.get("file"), (str,), f"{field}.file", "a file name")
        inputs = expect(spec.get("inputs"), (dict,), f"{field}.inputs", "a non-empty object",
                        nonempty=True)  # fmt: skip
        for input_name, want in inputs.items():
            where = f"{field}.inputs.{input_name}"
            expect(want, (dict,), where, "an object")
            if type(want.get("dtype")) is not str or want["dtype"] not in _DTYPES:
                raise _refuse(
                    source, f"{where}.dtype", want.get("dtype"), f"one of {list(_DTYPES)}"
                )
            for dim in expect(want.get("shape"), (list,), f"{where}.shape", "a list"):
                expect(dim, (int, str), f"{where}.shape", "a dimension (an int or a name)")
        outputs = expect(spec.get("outputs"), (list,), f"{field}.outputs",
                         "a non-empty list of names", nonempty=True)  # fmt: skip
        for out in outputs:
            expect(out, (str,), f"{field}.outputs", "an output name (string)")
    files = expect(metadata.get("files"), (dict,), "files", "an object of file name -> sha256")
    for name, digest in files.items():
        expect(digest, (str,), f"files.{name}", "a sha256 hex digest")


def verify_files(path: Path, metadata: dict) -> dict[str, Path]:
    """Every recorded file lies inside the bundle, exists and hashes to its sha256; every
    component is recorded. Returns {name in metadata.json: its resolved path}."""
    source = path / METADATA
    recorded = metadata["files"]
    resolved = {name: resolve_inside(path, name, source, f"files.{name}") for name in recorded}
    for component, spec in metadata["components"].items():
        resolve_inside(path, spec["file"], source, f"components.{component}.file")
        if spec["file"] not in recorded:
            raise DataValidationError(
                source, f"components.{component}.file", f"{spec['file']} has no sha256 in "
                "files", "re-export the run",
            )  # fmt: skip
    for name, digest in recorded.items():
        file = resolved[name]
        if not file.is_file():
            raise DataValidationError(
                path / name, "files", "missing from the bundle", "copy the whole bundle directory"
            )
        if sha256_file(file) != digest:
            raise DataValidationError(
                path / name, "sha256", "the file does not match the sha256 in metadata.json "
                "(changed or truncated since export)", "restore the file or re-export the run",
            )  # fmt: skip
    return resolved
