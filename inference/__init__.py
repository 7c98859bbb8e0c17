"""Loading finished runs and using them: generating cells, predicting perturbed populations.

Torch-free modules (``predict``, ``gene_names``) are shared with the ONNX runtime; the rest
load torch runs."""
