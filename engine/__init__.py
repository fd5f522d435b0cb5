"""fmh-engine runtime: sources, ring, front end, tracker, clips, transport, inference, report.

The runtime never imports torch; the PyTorch side lives in ``export`` and ``train``.
"""
from .errors import (ConfigError, DeliveryError, DetectError, EngineError, ModelError,
                     OverrunError, SourceError, WireError)
from .types import Blob, CellClip, ChipGeometry, Frame, Prediction, TrackStatus

__version__ = "0.1.0"

__all__ = ["__version__", "Frame", "Blob", "CellClip", "Prediction", "ChipGeometry",
           "TrackStatus", "EngineError", "ConfigError", "SourceError", "OverrunError",
           "DetectError", "ModelError", "WireError", "DeliveryError"]
