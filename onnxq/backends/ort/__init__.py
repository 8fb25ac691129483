"""onnxruntime (CPU): runner.py runs a model, build.py saves the optimized graph."""
