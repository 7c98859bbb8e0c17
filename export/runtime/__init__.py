"""Serve an exported bundle with numpy and onnxruntime only: no torch anywhere on this path.

    from latentcell.export.runtime import Bundle, OnnxGenerator, OnnxSetPredictor
    bundle = Bundle.load("bundle/")                  # sha256 of every file checked
    cells = OnnxGenerator(bundle).generate(100, {"cell_type": "B"}, seed=0)
    adata = cells.to_anndata()                       # anndata only to write files

Command line (``python -m latentcell.export.runtime --help``): ``generate``, ``predict`` and
``serve`` (an HTTP endpoint on 127.0.0.1). A test runs all of them where importing torch
fails.
"""

from .bundle import Bundle
from .generate import GeneratedCells, OnnxGenerator
from .predict import OnnxSetPredictor

__all__ = ["Bundle", "GeneratedCells", "OnnxGenerator", "OnnxSetPredictor"]
