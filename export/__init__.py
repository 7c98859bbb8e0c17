"""ONNX export of trained components and a torch-free onnxruntime sampler."""
