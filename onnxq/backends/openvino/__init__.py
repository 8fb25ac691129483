"""OpenVINO (CPU): runner.py compiles and runs a model, build.py writes IR and reads runtime precisions."""
