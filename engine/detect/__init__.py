"""The front end: background model, foreground, labelling, blob statistics, channel geometry.

    fe = FrontEnd(cfg)            # or FrontEnd(cfg, background=recorded_bg)
    fe.prime(frames)              # the report's median background (§3.6.1)
    blobs = fe.process(frame)     # list[engine.types.Blob]
    fe.geometry                   # ChipGeometry found in the background (or the config)

:func:`label` / :func:`measure` give the same labelling (8-connectivity) and statistics for
any binary image; :mod:`engine.detect.reference` holds the SciPy and OpenCV reference
implementations the benchmark compares against.
"""
from .blobs import FIELDS, label, measure, to_blobs
from .frontend import FrontEnd
from .geometry import GeometryNotFound, find_geometry

__all__ = ["FrontEnd", "find_geometry", "GeometryNotFound", "label", "measure", "to_blobs",
           "FIELDS"]
