"""Triton python-backend entry point: the shared ONNX Runtime model (../../ort_backend.py) for this role."""

import pathlib
import sys

sys.dont_write_bytecode = True  # a __pycache__ folder in the repository root would look like a model to Triton
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from ort_backend import OrtModel as TritonPythonModel  # noqa: E402,F401
