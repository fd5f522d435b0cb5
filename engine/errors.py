"""One exception hierarchy for the runtime.

Every error names the bad value (a file, a key, a shape) and, where there is one, the fix.
Catch :class:`EngineError` to handle anything the engine raises on purpose.
"""

__all__ = ["EngineError", "ConfigError", "SourceError", "OverrunError", "DetectError",
           "ModelError", "WireError", "DeliveryError"]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, impossible value)."""


class SourceError(EngineError, IOError):
    """A frame source cannot be opened or read (missing, truncated or corrupt file, bad shape)."""


class OverrunError(EngineError):
    """A reader fell so far behind a ring that the frames it asked for were overwritten."""


class DetectError(EngineError, ValueError):
    """The front end got input it cannot work on (wrong shape or dtype, empty background)."""


class ModelError(EngineError):
    """A model artefact is missing, corrupt, of the wrong version or built for other hardware."""


class WireError(EngineError, ValueError):
    """A message on the wire is malformed, truncated, oversized or of an unknown version."""


class DeliveryError(EngineError):
    """A clip could not be delivered or answered (no worker, worker died beyond retries)."""
