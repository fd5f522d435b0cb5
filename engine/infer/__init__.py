"""Inference side of the runtime (no torch): the model artefact, preprocessing, backends."""
from .artefact import ModelArtefact, default_model_path
from .preprocess import InputSpec, average_views, preprocess

__all__ = ["ModelArtefact", "default_model_path", "InputSpec", "preprocess", "average_views"]
