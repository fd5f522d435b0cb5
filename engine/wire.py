"""The one wire format between dispatcher, inference workers and live subscribers.

A message is a ZeroMQ multipart message ``[header, payload_0, payload_1, ...]``:

* ``header`` is UTF-8 JSON (an object, at most :data:`MAX_HEADER_BYTES`) with at least
  ``v`` (protocol version, :data:`VERSION`), ``kind`` (one of :data:`KINDS`) and ``run``
  (the run id), and ``arrays``: one ``{"name", "dtype", "shape"}`` entry per payload frame;
* each payload frame is the raw bytes of one C-ordered array, exactly
  ``prod(shape) * itemsize`` long, of a dtype in :data:`DTYPES`.

Everything received is validated before any array is allocated: version, kind, required keys
and their types, array names, dtypes, ranks, sizes against ``max_bytes`` and the byte length
of every frame. A bad message raises :class:`~engine.errors.WireError` naming the reason; the
rest of its frames are drained so the socket stays usable. Nothing is ever unpickled.

Payloads are received straight into freshly allocated (writeable) arrays with
``Socket.recv_into``; big arrays are sent with ``copy=False`` (the caller must not modify them
until the message has left, which holds for the immutable :class:`~engine.types.CellClip`).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import zmq

from .errors import WireError
from .types import CellClip, Prediction, TrackStatus

__all__ = ["VERSION", "KINDS", "DTYPES", "MAX_HEADER_BYTES", "MAX_ARRAYS", "ZERO_COPY_BYTES",
           "Message", "encode", "decode", "parse_header", "validate_header", "send", "recv",
           "encode_clip", "decode_clip", "encode_prediction", "decode_prediction",
           "prediction_to_json"]

VERSION = 1
#: Message kinds. Worker -> dispatcher: hello, credit, prediction, heartbeat, bye.
#: Dispatcher -> worker: clip, eos, reset. Dispatcher -> subscribers (PUB): prediction, stats, eos.
KINDS = ("hello", "credit", "clip", "prediction", "heartbeat", "eos", "reset", "bye", "stats")
#: Array dtypes accepted on the wire (little-endian, as numpy names them).
DTYPES = {"uint8": np.dtype("<u1"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8"),
          "float32": np.dtype("<f4")}
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 8
MAX_RANK = 4
MAX_STR = 4096
MAX_DEPTH = 8
#: Arrays at least this big [bytes] are sent without copying (pitfall 13: only pays off for
#: big buffers).
ZERO_COPY_BYTES = 64 * 1024

_INT_LIMIT = 2 ** 63 - 1
_NUM = (int, float)

# Per kind: required key -> accepted types (in addition to v, kind, run, arrays).
_REQUIRED: dict[str, dict[str, tuple]] = {
    "hello": {"model_id": (str,), "max_batch": (int,), "credits": (int,)},
    "credit": {"n": (int,)},
    "clip": {"cell": (int,), "seq": (int,)},
    "prediction": {"cell": (int,), "seq": (int,), "p_fetal": (int, float, type(None)),
                   "label": (str,), "probs": (list,), "error": (str,)},
    "heartbeat": {},
    "eos": {},
    "reset": {},
    "bye": {},
    "stats": {"counters": (dict,)},
}
# Optional keys with their types, checked when present.
_OPTIONAL: dict[str, tuple] = {
    "status": (str,), "reason": (str,), "t0_ns": (int,), "t_exit_ns": (int,),
    "features": (dict,), "model_id": (str,), "worker": (str,), "pid": (int,),
    "backend": (str,), "compute_ms": _NUM, "wait_ms": _NUM, "held_ms": _NUM, "latency_ms": (int, float, type(None)),
    "sent_ns": (int,), "backlog": (int,), "stats": (dict,), "counters": (dict,), "classes": (list,),
}
# Arrays a kind must carry: name -> (dtype, rank).
_CLIP_ARRAYS = {"frames": ("uint8", 3), "frame_indices": ("int64", 1),
                "centroids": ("float32", 2), "boxes": ("int32", 2), "areas": ("int32", 1)}
_ARRAYS: dict[str, dict[str, tuple[str, int]]] = {"clip": _CLIP_ARRAYS}


class Message(NamedTuple):
    """A decoded message: its validated JSON header and its arrays by name."""

    header: dict
    arrays: dict

    @property
    def kind(self) -> str:
        return self.header["kind"]


# ------------------------------------------------------------------------------------------
# Header validation
# ------------------------------------------------------------------------------------------

def _type_ok(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):             # bool is an int in Python; never accept it as one
        return bool in types
    if not isinstance(value, types):
        return False
    if isinstance(value, int) and not -_INT_LIMIT <= value <= _INT_LIMIT:
        return False
    if isinstance(value, float) and math.isinf(value):
        return False
    if isinstance(value, str) and len(value) > MAX_STR:
        return False
    return True


def parse_header(buf: bytes | memoryview, n_payload: int, *, max_bytes: int) -> tuple[dict, list]:
    """Validate one header frame against the number of payload frames that follow it.

    Parameters
    ----------
    buf : bytes-like
        The header frame.
    n_payload : int
        Number of payload frames in the message.
    max_bytes : int
        Largest accepted total payload [bytes] (``cfg.serving.max_message_bytes``).

    Returns
    -------
    header : dict
    specs : list of (name, dtype, shape, nbytes)
        One per payload frame, in order.

    Raises
    ------
    WireError
        Naming what is wrong.
    """
    if len(buf) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(buf)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    return validate_header(_peek_header(buf), n_payload, max_bytes=max_bytes)


def validate_header(header: dict, n_payload: int, *, max_bytes: int) -> tuple[dict, list]:
    """Validate an already parsed header; see :func:`parse_header`."""
    v = header.get("v")
    if v != VERSION or isinstance(v, bool):
        raise WireError(f"protocol version {v!r} is not supported (expected {VERSION})")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in _REQUIRED:
        raise WireError(f"unknown message kind {kind!r} (known: {', '.join(KINDS)})")
    if not _type_ok(header.get("run"), (str,)):
        raise WireError(f"{kind}: 'run' must be a string, got {header.get('run')!r:.80}")
    for key, types in _REQUIRED[kind].items():
        if key not in header:
            raise WireError(f"{kind}: required key {key!r} is missing")
        if not _type_ok(header[key], types):
            raise WireError(f"{kind}: key {key!r} has a wrong type or value: {header[key]!r:.80}")
    for key, types in _OPTIONAL.items():
        if key in header and key not in _REQUIRED[kind] and not _type_ok(header[key], types):
            raise WireError(f"{kind}: key {key!r} has a wrong type or value: {header[key]!r:.80}")
    for key in ("cell", "seq", "n", "max_batch", "credits"):
        if key in header and isinstance(header[key], int) and header[key] < 0:
            raise WireError(f"{kind}: key {key!r} must be >= 0, got {header[key]}")
    if kind == "prediction":
        p = header["p_fetal"]
        if p is not None and not (0.0 <= p <= 1.0):
            raise WireError(f"prediction: p_fetal {p!r} is not a probability")
        probs = header["probs"]
        if len(probs) > 1024 or not all(_type_ok(x, _NUM) for x in probs):
            raise WireError("prediction: probs must be a short list of numbers")
    if kind == "clip" and "features" in header:
        feats = header["features"]
        # A feature that could not be measured travels as null (JSON has no NaN).
        if len(feats) > 512 or not all(isinstance(k, str) and (x is None or _type_ok(x, _NUM))
                                       for k, x in feats.items()):
            raise WireError("clip: features must map names to numbers or null (at most 512)")
    specs = _parse_arrays(header, kind, n_payload, max_bytes)
    return header, specs


def _parse_arrays(header: dict, kind: str, n_payload: int, max_bytes: int) -> list:
    arrays = header.get("arrays", [])
    if not isinstance(arrays, list) or len(arrays) > MAX_ARRAYS:
        raise WireError(f"{kind}: 'arrays' must be a list of at most {MAX_ARRAYS} entries")
    if len(arrays) != n_payload:
        raise WireError(f"{kind}: header lists {len(arrays)} arrays but {n_payload} payload "
                        f"frames follow (truncated or padded message)")
    expected = _ARRAYS.get(kind, {})
    specs, total, seen = [], 0, set()
    for i, a in enumerate(arrays):
        if not isinstance(a, dict):
            raise WireError(f"{kind}: arrays[{i}] must be an object")
        name, dtype, shape = a.get("name"), a.get("dtype"), a.get("shape")
        if not isinstance(name, str) or name not in expected or name in seen:
            raise WireError(f"{kind}: unexpected or repeated array name {name!r:.80}")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise WireError(f"{kind}: array {name!r} has dtype {dtype!r:.40}; accepted: "
                            f"{', '.join(DTYPES)}")
        want_dtype, want_rank = expected[name]
        if dtype != want_dtype:
            raise WireError(f"{kind}: array {name!r} must be {want_dtype}, got {dtype}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 2 ** 31
                           for s in shape)):
            raise WireError(f"{kind}: array {name!r} has an invalid shape {shape!r:.80}")
        if len(shape) != want_rank:
            raise WireError(f"{kind}: array {name!r} must have rank {want_rank}, got {len(shape)}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        total += nbytes
        if total > max_bytes:
            raise WireError(f"{kind}: arrays of {total} bytes exceed max_message_bytes={max_bytes}")
        specs.append((name, DTYPES[dtype], tuple(shape), nbytes))
    missing = set(expected) - seen
    if missing:
        raise WireError(f"{kind}: required arrays missing: {', '.join(sorted(missing))}")
    if kind == "clip":
        _check_clip_shapes({n: s for n, _, s, _ in specs})
    return specs


def _check_clip_shapes(shapes: Mapping[str, tuple]) -> None:
    t = shapes["frames"][0]
    if t < 1:
        raise WireError("clip: has no frames")
    for name, want in (("frame_indices", (t,)), ("centroids", (t, 2)), ("boxes", (t, 4)),
                       ("areas", (t,))):
        if shapes[name] != want:
            raise WireError(f"clip: array {name!r} has shape {shapes[name]}, expected {want} "
                            f"for {t} frames")


# ------------------------------------------------------------------------------------------
# Encoding / decoding of whole messages
# ------------------------------------------------------------------------------------------

def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating,)):
        return _json_safe(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def encode(kind: str, run: str, arrays: Mapping[str, np.ndarray] | None = None,
           **fields: Any) -> list:
    """Frames of one message: ``[header bytes, array, ...]`` (arrays made C-contiguous).

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    run : str
        Run id.
    arrays : mapping of name to ndarray, optional
        Payload arrays (dtypes in :data:`DTYPES`).
    **fields
        Further header keys (JSON-serialisable; non-finite floats become ``null``).
    """
    if kind not in _REQUIRED:
        raise WireError(f"unknown message kind {kind!r}")
    payload, specs = [], []
    for name, arr in (arrays or {}).items():
        arr = np.asarray(arr)
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt.name not in DTYPES:
            raise WireError(f"array {name!r}: dtype {arr.dtype} cannot be sent "
                            f"(accepted: {', '.join(DTYPES)})")
        arr = np.ascontiguousarray(arr, dtype=DTYPES[dt.name])
        payload.append(arr)
        specs.append({"name": name, "dtype": dt.name, "shape": list(arr.shape)})
    header = {"v": VERSION, "kind": kind, "run": run, **_json_safe(fields), "arrays": specs}
    return [json.dumps(header, allow_nan=False, separators=(",", ":")).encode()] + payload


def decode(frames: Sequence[Any], *, max_bytes: int) -> Message:
    """Decode a list of received frames (bytes-like) into a :class:`Message`.

    The arrays are read-only views of the frames (no copy).
    """
    if not frames:
        raise WireError("empty message")
    if len(frames) > MAX_ARRAYS + 1:
        raise WireError(f"message has {len(frames)} frames (at most {MAX_ARRAYS + 1})")
    try:
        header, specs = parse_header(_buffer(frames[0]), len(frames) - 1, max_bytes=max_bytes)
    except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"malformed header ({type(exc).__name__}: {exc})") from None
    arrays = {}
    for (name, dtype, shape, nbytes), frame in zip(specs, frames[1:]):
        buf = _buffer(frame)
        if len(buf) != nbytes:
            raise WireError(f"{header['kind']}: array {name!r} has {len(buf)} bytes, "
                            f"expected {nbytes} for shape {shape}")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(header, arrays)


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame).cast("B")


# ------------------------------------------------------------------------------------------
# Socket helpers
# ------------------------------------------------------------------------------------------

def send(sock: zmq.Socket, frames: list, *, identity: bytes | None = None,
         flags: int = 0) -> None:
    """Send encoded frames; arrays of at least :data:`ZERO_COPY_BYTES` go without copying."""
    parts = ([identity] if identity is not None else []) + list(frames)
    last = len(parts) - 1
    for i, part in enumerate(parts):
        big = isinstance(part, np.ndarray) and part.nbytes >= ZERO_COPY_BYTES
        sock.send(part, flags=flags | (zmq.SNDMORE if i < last else 0), copy=not big)


def _drain(sock: zmq.Socket) -> int:
    n = 0
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(copy=False)           # dropped at once; each frame bounded by MAXMSGSIZE
        n += 1
    return n


def recv(sock: zmq.Socket, *, max_bytes: int, routed: bool = False,
         flags: int = 0) -> tuple[bytes | None, Message]:
    """Receive and validate one message; payloads land straight in new arrays.

    Parameters
    ----------
    sock : zmq.Socket
    max_bytes : int
        Largest accepted total payload [bytes].
    routed : bool
        The socket is a ROUTER: the first frame is the peer's identity.
    flags : int
        ``zmq.NOBLOCK`` to raise :class:`zmq.Again` when nothing is waiting.

    Returns
    -------
    identity : bytes or None
    message : Message

    Raises
    ------
    WireError
        The message was malformed; all its frames have been consumed. ``exc.identity`` holds
        the sender (ROUTER) and ``exc.header`` the header when it could be parsed.
    """
    identity = None
    if routed:
        identity = sock.recv(flags=flags)
        flags = 0
        if not sock.getsockopt(zmq.RCVMORE):
            raise _error(WireError("message has no header frame"), identity, None)
    head = sock.recv(flags=flags, copy=False)
    more = sock.getsockopt(zmq.RCVMORE)
    header = None
    try:
        if len(head) > MAX_HEADER_BYTES:
            raise WireError(f"header of {len(head)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        # The header names how many arrays follow; the frames themselves are counted as they
        # arrive, so the count is taken from the header and checked frame by frame.
        header = _peek_header(head.buffer)
        n_declared = len(header.get("arrays", [])) if isinstance(header.get("arrays"), list) else -1
        if n_declared < 0 or n_declared > MAX_ARRAYS:
            raise WireError("'arrays' must be a list of at most %d entries" % MAX_ARRAYS)
        header, specs = validate_header(header, n_declared, max_bytes=max_bytes)
        arrays = {}
        for name, dtype, shape, nbytes in specs:
            if not more:
                raise WireError(f"{header['kind']}: truncated message, array {name!r} missing")
            arr = np.empty(shape, dtype=dtype)
            if nbytes:
                got = sock.recv_into(arr.reshape(-1).view(np.uint8))
            else:
                got = len(sock.recv(copy=False))
            more = sock.getsockopt(zmq.RCVMORE)
            if got != nbytes:
                raise WireError(f"{header['kind']}: array {name!r} has {got} bytes, expected "
                                f"{nbytes} for shape {shape}")
            arrays[name] = arr
        if more:
            raise WireError(f"{header['kind']}: more frames than the {len(specs)} arrays declared")
        return identity, Message(header, arrays)
    except WireError as exc:
        _drain(sock)
        raise _error(exc, identity, header if isinstance(header, dict) else None) from None
    except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as exc:
        # A validation gap is still a malformed message, never a crash of the receiver.
        _drain(sock)
        raise _error(WireError(f"malformed message ({type(exc).__name__}: {exc})"), identity,
                     None) from None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def _nesting(raw: bytes) -> int:
    """Deepest bracket nesting of JSON text (strings ignored), vectorised."""
    stripped = _STRING.sub(b'""', raw)
    if not stripped:
        return 0
    steps = _OPEN[np.frombuffer(stripped, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _peek_header(buf: memoryview) -> dict:
    raw = bytes(buf)
    # Deeply nested JSON overflows the C stack of json's decoder (a crash, not an exception,
    # in a thread): bound the depth before parsing.
    if _nesting(raw) > MAX_DEPTH:
        raise WireError(f"header JSON is nested deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"header is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _error(exc: WireError, identity: bytes | None, header: dict | None) -> WireError:
    exc.identity = identity
    exc.header = header
    return exc


# ------------------------------------------------------------------------------------------
# Typed messages
# ------------------------------------------------------------------------------------------

def encode_clip(clip: CellClip, *, run: str, seq: int, **fields: Any) -> list:
    """Frames of a ``clip`` message for one :class:`~engine.types.CellClip`."""
    arrays = {}
    for name, (dtype, _) in _CLIP_ARRAYS.items():
        a = np.asarray(getattr(clip, name))
        if not np.can_cast(a.dtype, dtype, casting="same_kind") or (
                name == "frames" and a.dtype != np.uint8):
            raise WireError(f"clip {clip.cell_id}: {name} has dtype {a.dtype}, expected {dtype}")
        arrays[name] = a.astype(dtype, copy=False)
    status = clip.status.value if isinstance(clip.status, TrackStatus) else str(clip.status)
    return encode("clip", run, arrays, cell=int(clip.cell_id), seq=int(seq), status=status,
                  reason=clip.reason, t0_ns=int(clip.t0_ns), t_exit_ns=int(clip.t_exit_ns),
                  features={str(k): float(v) for k, v in dict(clip.features).items()}, **fields)


def decode_clip(msg: Message) -> CellClip:
    """The :class:`~engine.types.CellClip` of a validated ``clip`` message."""
    if msg.kind != "clip":
        raise WireError(f"expected a clip message, got {msg.kind!r}")
    h, a = msg.header, msg.arrays
    try:
        status = TrackStatus(h.get("status", "complete"))
    except ValueError:
        raise WireError(f"clip: unknown status {h.get('status')!r:.40}") from None
    return CellClip(cell_id=h["cell"], frames=a["frames"], frame_indices=a["frame_indices"],
                    centroids=a["centroids"], boxes=a["boxes"], areas=a["areas"],
                    status=status, reason=h.get("reason", ""), t0_ns=h.get("t0_ns", 0),
                    t_exit_ns=h.get("t_exit_ns", 0),
                    features={k: (float("nan") if v is None else v)
                              for k, v in h.get("features", {}).items()})


def encode_prediction(pred: Prediction, *, run: str, seq: int, **fields: Any) -> list:
    """Frames (a single header) of a ``prediction`` message."""
    return encode("prediction", run, None, cell=int(pred.cell_id), seq=int(seq),
                  p_fetal=pred.p_fetal, label=pred.label, probs=[float(p) for p in pred.probs],
                  model_id=pred.model_id, latency_ms=pred.latency_ms, error=pred.error, **fields)


def decode_prediction(msg: Message) -> Prediction:
    """The :class:`~engine.types.Prediction` of a validated ``prediction`` message."""
    if msg.kind != "prediction":
        raise WireError(f"expected a prediction message, got {msg.kind!r}")
    h = msg.header
    p = h["p_fetal"]
    lat = h.get("latency_ms")
    return Prediction(cell_id=h["cell"], p_fetal=float("nan") if p is None else float(p),
                      label=h["label"], probs=tuple(float(x) for x in h["probs"]),
                      model_id=h.get("model_id", ""),
                      latency_ms=float("nan") if lat is None else float(lat), error=h["error"])


def prediction_to_json(pred: Prediction, **extra: Any) -> dict:
    """A JSON-safe dict of a prediction (NaN -> null), e.g. for predictions.jsonl."""
    d = {"cell_id": pred.cell_id, "p_fetal": pred.p_fetal, "label": pred.label,
         "probs": list(pred.probs), "model_id": pred.model_id, "latency_ms": pred.latency_ms,
         "error": pred.error, **extra}
    return _json_safe(d)
