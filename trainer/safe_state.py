"""Training state on disk without pickle: a tree of tensors and JSON scalars in one safetensors file.

Why not ``torch.save``: loading a pickle runs whatever callable the file names, so a crafted
checkpoint in a shared run directory would execute code on ``--resume``. Safetensors holds
only tensors (a JSON header, then raw bytes) and JSON holds only data, so reading either can
at worst fail. The optimizer's ``state_dict``, RNG states and similar nested states are mostly
tensors inside dicts, lists and tuples with int keys, which neither format expresses alone:
:func:`save_tree` puts the tensors in the file and the structure, as JSON, in the file's
header metadata (``"latentcell.tree"``). Tuples and dicts with non-string keys are tagged so
they come back as they went in (``random.setstate`` needs tuples; an optimizer's state is
keyed by int). Anything else (numpy arrays, objects, functions) is refused when *saving*,
naming where in the tree it sits, so an unsupported state fails at the first checkpoint
rather than at resume.

:func:`rng_state` / :func:`set_rng_state` express this process's random generators (python,
numpy's global one, torch CPU and every CUDA device) in that vocabulary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["TREE_KEY", "decode", "encode", "load_tree", "rng_state", "save_tree", "set_rng_state"]

TREE_KEY = "latentcell.tree"
_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"
_SCALARS = (bool, int, float, str, type(None))


def encode(tree: Any, tensors: dict[str, torch.Tensor] | None = None, where: str = "") -> Any:
    """``tree`` as JSON-ready data; tensors are moved into ``tensors`` (refused if None)."""
    if isinstance(tree, torch.Tensor):
        if tensors is None:
            raise TypeError(f"{where or '<root>'}: a tensor where only JSON values may go")
        key = f"t{len(tensors)}"
        tensors[key] = tree.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(tree, _SCALARS):
        return tree
    if type(tree) is tuple:  # not a subclass (namedtuple, torch.Size): it would come back plain
        return {_TUPLE: [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(tree)]}
    if type(tree) is list:
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("$") for k in tree)
        if plain:
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in tree.items()}
        items = []
        for k, v in tree.items():
            if not isinstance(k, _SCALARS):
                raise TypeError(f"{where or '<root>'}: dict key {k!r} is not a JSON scalar")
            items.append([k, encode(v, tensors, f"{where}[{k!r}]")])
        return {_ITEMS: items}
    raise TypeError(
        f"{where or '<root>'}: {type(tree).__module__}.{type(tree).__qualname__} cannot be "
        "saved without pickle (only tensors, JSON scalars, lists, tuples and dicts)"
    )


def decode(data: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The inverse of :func:`encode`; raises ``ValueError`` on anything it did not write."""
    if isinstance(data, _SCALARS):
        return data
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        raise ValueError(f"unexpected {type(data).__name__} in the state tree")
    if len(data) == 1 and _TENSOR in data:
        key = data[_TENSOR]
        if tensors is None or not isinstance(key, str) or key not in tensors:
            raise ValueError(f"the state tree names a tensor {key!r} the file does not hold")
        return tensors[key]
    if len(data) == 1 and _TUPLE in data and isinstance(data[_TUPLE], list):
        return tuple(decode(v, tensors) for v in data[_TUPLE])
    if len(data) == 1 and _ITEMS in data and isinstance(data[_ITEMS], list):
        out = {}
        for item in data[_ITEMS]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], _SCALARS)):
                raise ValueError("malformed dict entry in the state tree")
            out[item[0]] = decode(item[1], tensors)
        return out
    if any(k.startswith("$") for k in data):
        raise ValueError(f"unknown tag in the state tree: {sorted(data)}")
    return {k: decode(v, tensors) for k, v in data.items()}


def save_tree(tree: Any, path: Path) -> None:
    """``tree`` as one safetensors file (structure in its header), atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(encode(tree, tensors))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={TREE_KEY: structure})
    tmp.replace(path)


def load_tree(path: Path, fix: str) -> Any:
    """Read a :func:`save_tree` file; never unpickles. Anything wrong with the file becomes a
    ``DataValidationError`` naming it, with ``fix`` as the advice."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        if TREE_KEY not in metadata:
            raise ValueError(f"no {TREE_KEY!r} entry in its header")
        return decode(json.loads(metadata[TREE_KEY]), tensors)
    except FileNotFoundError:
        raise DataValidationError(path, "file", "missing", fix) from None
    except Exception as err:  # safetensors raises its own error type; a bad tree ValueError
        problem = f"not a readable state file ({' '.join(str(err).split())[:200]})"
        raise DataValidationError(path, "contents", problem, fix) from None


def rng_state() -> dict[str, Any]:
    """This process's generators: python ``random``, numpy's global one, torch CPU and, once
    CUDA is in use, this process's current CUDA device (Accelerate saves every visible
    device's, which initializes a context on each; one process trains on one device)."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": str(kind),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device (Accelerate sets it)
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`; raises ``ValueError``/``TypeError`` on a malformed state."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    n = state["numpy"]
    key = np.asarray(n["key"], dtype=np.int64)
    if key.shape != (624,) or key.min() < 0 or key.max() >= 2**32:
        raise ValueError("numpy MT19937 key must be 624 unsigned 32-bit integers")
    np.random.set_state(
        (str(n["kind"]), key.astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
         float(n["cached_gaussian"]))
    )  # fmt: skip
    cpu = state["torch"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise ValueError("torch CPU generator state must be a uint8 tensor")
    torch.set_rng_state(cpu)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
