"""The wire format: round trips, and every malformed message rejected before allocation."""
import json

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import wire
from engine.errors import WireError
from engine.types import Prediction, TrackStatus
from tests.helpers_model import make_clip

MAX = 1 << 20


def _header(frames):
    return json.loads(bytes(frames[0]))


def _with_header(frames, **changes):
    h = _header(frames)
    h.update(changes)
    return [json.dumps(h).encode()] + list(frames[1:])


def test_clip_round_trip_keeps_every_field():
    clip = make_clip(7)
    frames = wire.encode_clip(clip, run="r1", seq=42)
    msg = wire.decode(frames, max_bytes=MAX)
    assert msg.kind == "clip" and msg.header["seq"] == 42 and msg.header["run"] == "r1"
    back = wire.decode_clip(msg)
    assert back.cell_id == 7 and back.status is TrackStatus.COMPLETE
    for name in ("frames", "frame_indices", "centroids", "boxes", "areas"):
        np.testing.assert_array_equal(getattr(back, name), getattr(clip, name))
        assert getattr(back, name).dtype == wire.DTYPES[msg.header["arrays"][
            [a["name"] for a in msg.header["arrays"]].index(name)]["dtype"]]
    assert back.features == {"area_um": 10.5} and back.t0_ns == clip.t0_ns


def test_clip_with_unmeasured_feature_round_trips_as_nan():
    # A feature that could not be measured (NaN) must not make the clip malformed.
    from dataclasses import replace
    clip = replace(make_clip(8), features={"area_um": 10.5, "transit_ms": float("nan")})
    frames = wire.encode_clip(clip, run="r1", seq=1)
    assert _header(frames)["features"]["transit_ms"] is None
    back = wire.decode_clip(wire.decode(frames, max_bytes=MAX))
    assert back.features["area_um"] == 10.5 and np.isnan(back.features["transit_ms"])


def test_prediction_round_trip_nan_becomes_null():
    pred = Prediction(cell_id=3, p_fetal=float("nan"), label="", error="bad clip")
    frames = wire.encode_prediction(pred, run="r", seq=1)
    assert _header(frames)["p_fetal"] is None            # standard JSON, no NaN token
    back = wire.decode_prediction(wire.decode(frames, max_bytes=MAX))
    assert np.isnan(back.p_fetal) and back.error == "bad clip" and back.cell_id == 3


@pytest.mark.parametrize("change, reason", [
    ({"v": 2}, "version"),
    ({"v": True}, "version"),
    ({"kind": "pickle"}, "unknown message kind"),
    ({"run": 5}, "'run'"),
    ({"cell": "7"}, "'cell'"),
    ({"cell": -1}, ">= 0"),
    ({"seq": True}, "'seq'"),
    ({"features": {"a": "x"}}, "features"),
])
def test_header_errors_name_the_problem(change, reason):
    frames = _with_header(wire.encode_clip(make_clip(1), run="r", seq=0), **change)
    with pytest.raises(WireError, match=reason):
        wire.decode(frames, max_bytes=MAX)


def test_array_spec_errors():
    frames = wire.encode_clip(make_clip(1), run="r", seq=0)
    h = _header(frames)

    def bad(mutate, reason, payload=None):
        hh = json.loads(json.dumps(h))
        mutate(hh)
        with pytest.raises(WireError, match=reason):
            wire.decode([json.dumps(hh).encode()] + (payload or list(frames[1:])), max_bytes=MAX)

    bad(lambda x: x["arrays"][0].update(dtype="object"), "dtype")
    bad(lambda x: x["arrays"][0].update(dtype="float64"), "dtype")
    bad(lambda x: x["arrays"][0].update(dtype="int64"), "must be uint8")
    bad(lambda x: x["arrays"][0].update(shape=[8, 16]), "rank")
    bad(lambda x: x["arrays"][0].update(shape=[8, 16, -16]), "invalid shape")
    bad(lambda x: x["arrays"][0].update(shape=[8, 16, 17]), "bytes")
    bad(lambda x: x["arrays"][0].update(shape=[2 ** 31, 2 ** 31, 2 ** 31]), "max_message_bytes")
    bad(lambda x: x["arrays"][1].update(shape=[7]), "frame_indices")
    bad(lambda x: x["arrays"][0].update(name="evil"), "unexpected")
    bad(lambda x: x["arrays"].pop(), "arrays but")
    bad(lambda x: None, "arrays but", payload=list(frames[1:3]))      # truncated
    bad(lambda x: x.pop("arrays"), "arrays but")


def test_not_json_and_oversized_header():
    with pytest.raises(WireError, match="JSON"):
        wire.decode([b"\x80\x04\x95 pickle"], max_bytes=MAX)
    with pytest.raises(WireError, match="JSON object"):
        wire.decode([b"[1, 2]"], max_bytes=MAX)
    with pytest.raises(WireError, match="exceeds"):
        wire.decode([b" " * (wire.MAX_HEADER_BYTES + 1)], max_bytes=MAX)
    with pytest.raises(WireError, match="nested"):      # would overflow json's C stack
        wire.decode([b"[" * 30000 + b"]" * 30000], max_bytes=MAX)
    with pytest.raises(WireError, match="empty"):
        wire.decode([], max_bytes=MAX)


def test_encode_refuses_unlisted_dtypes():
    with pytest.raises(WireError, match="float64"):
        wire.encode("clip", "r", {"frames": np.zeros((2, 2, 2))}, cell=0, seq=0)


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    a.close()
    b.close()
    ctx.term()


def test_socket_recv_into_fresh_writeable_arrays_and_drains_bad_messages(pair):
    a, b = pair
    clip = make_clip(5, frames=40, size=64)          # 160 kB: sent without copying
    wire.send(a, wire.encode_clip(clip, run="r", seq=9))
    _, msg = wire.recv(b, max_bytes=MAX)
    assert msg.arrays["frames"].flags.writeable and msg.arrays["frames"].flags.c_contiguous
    np.testing.assert_array_equal(msg.arrays["frames"], clip.frames)
    # A message whose payload is longer than its header says, then a good one: the bad one is
    # rejected and fully drained, the good one is read intact.
    good = wire.encode_clip(make_clip(6), run="r", seq=10)
    bad = _with_header(good, arrays=_header(good)["arrays"])
    bad[1] = np.zeros(100_000, np.uint8)
    a.send_multipart(bad)
    a.send_multipart(good + [b"extra"])
    wire.send(a, good)
    with pytest.raises(WireError, match="bytes"):
        wire.recv(b, max_bytes=MAX)
    with pytest.raises(WireError, match="more frames"):
        wire.recv(b, max_bytes=MAX)
    _, ok = wire.recv(b, max_bytes=MAX)
    assert ok.header["seq"] == 10
    # Oversized against max_bytes: rejected from the header alone.
    wire.send(a, wire.encode_clip(clip, run="r", seq=11))
    with pytest.raises(WireError, match="max_message_bytes") as info:
        wire.recv(b, max_bytes=1000)
    assert info.value.header["seq"] == 11             # so the receiver can answer the cell
    assert not b.getsockopt(zmq.RCVMORE)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["v", "kind", "run", "cell", "seq", "arrays",
                                               "p_fetal", "probs", "label", "error", "n"]),
                              _json_values, max_size=8),
       payload=st.lists(st.binary(max_size=64), max_size=3))
def test_decode_raises_only_wire_error(header, payload):
    try:
        wire.decode([json.dumps(header).encode()] + payload, max_bytes=MAX)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(kind=_json_values | st.sampled_from(["clip", "prediction", "hello"]),
       arrays=st.lists(st.dictionaries(st.sampled_from(["name", "dtype", "shape"]),
                                       _json_values | st.sampled_from(["frames", "uint8"]),
                                       max_size=3), max_size=6))
def test_decode_of_hostile_array_specs_raises_only_wire_error(kind, arrays):
    header = {"v": 1, "kind": kind, "run": "r", "cell": 1, "seq": 1, "arrays": arrays}
    try:
        wire.decode([json.dumps(header).encode()] + [b"\0"] * len(arrays), max_bytes=MAX)
    except WireError:
        pass


def test_encode_clip_refuses_lossy_conversions():
    import dataclasses
    clip = make_clip(1)
    with pytest.raises(WireError, match="frames has dtype float64"):
        wire.encode_clip(dataclasses.replace(clip, frames=clip.frames.astype(float)), run="r", seq=0)
    with pytest.raises(WireError, match="frame_indices has dtype float64"):
        wire.encode_clip(dataclasses.replace(clip, frame_indices=clip.frame_indices * 1.0),
                         run="r", seq=0)
    ok = wire.encode_clip(dataclasses.replace(clip, centroids=clip.centroids.astype(np.float64)),
                          run="r", seq=0)
    assert wire.decode(ok, max_bytes=MAX).arrays["centroids"].dtype == np.float32
