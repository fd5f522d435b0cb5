"""Incremental tracking: motion prediction, joint assignment, and the linker.

``Linker(cfg, geometry).next_level(frame, blobs) -> list[CellClip]``; ``flush()`` at the end.
"""
from .assign import Assigner, STRATEGIES
from .linker import Linker, link_iter
from .predict import PREDICTORS, FlowPredict, NullPredict, VelocityPredict, make_predictor

__all__ = ["Linker", "link_iter", "Assigner", "STRATEGIES", "PREDICTORS", "FlowPredict",
           "NullPredict", "VelocityPredict", "make_predictor"]
