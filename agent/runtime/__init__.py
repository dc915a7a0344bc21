"""Interpreters and delegates: load a release on the Edge TPU or the CPU and run it."""

from agent.runtime.adapters import Detection, Geometry, InputNorm, Output
from agent.runtime.backends import Backend, TensorSpec, is_edgetpu_model, runtime_api
from agent.runtime.model import BACKENDS, LoadedModel, ModelFiles, load_model

__all__ = [
    "BACKENDS",
    "Backend",
    "Detection",
    "Geometry",
    "InputNorm",
    "LoadedModel",
    "ModelFiles",
    "Output",
    "TensorSpec",
    "is_edgetpu_model",
    "load_model",
    "runtime_api",
]
