"""Frame sources: replayed files, the synthetic chip, cameras; ``open_source`` picks one.

SOURCE strings
--------------
``path.npy`` / ``.tif`` / ``.tiff`` / ``.h5`` / ``.hdf5`` / ``.rtdc`` / video / a folder of
images: replay (see :mod:`engine.sources.replay`).
``sim://`` or ``sim://?seed=3&rate_hz=20&frames=5000``: the synthetic PolyNano chip
(see :mod:`engine.sources.sim`); query keys are ``sim`` config keys plus ``frames``.
``genicam://`` or ``genicam://<cti-file>?serial=...``: a GenICam camera through harvesters
(see :mod:`engine.sources.camera`).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlparse

from ..errors import SourceError
from .base import FrameSource, SourceStats

__all__ = ["FrameSource", "SourceStats", "open_source"]


def open_source(spec: str, cfg=None, **options: Any) -> FrameSource:
    """Make (not yet open) the source that ``spec`` names.

    Parameters
    ----------
    spec : str
        A path or a URI (see the module docstring).
    cfg : engine.config.Config, optional
        The run's configuration (defaults if omitted).
    **options
        Passed to the source's constructor (for replays: ``key=`` for HDF5 datasets, etc.).
    """
    from ..config import load_config
    cfg = cfg if cfg is not None else load_config()
    spec = str(spec)
    if "://" in spec:
        url = urlparse(spec)
        query = dict(parse_qsl(url.query))
        if url.scheme == "sim":
            from .sim import SyntheticChipSource
            return SyntheticChipSource.from_query(cfg, query, **options)
        if url.scheme == "genicam":
            from .camera import GenICamCamera
            return GenICamCamera.from_url(url, query, **options)
        raise SourceError(f"{spec}: unknown source scheme {url.scheme!r} (use a path, sim:// or genicam://)")
    from .replay import open_replay
    return open_replay(spec, cfg=cfg, **options)
