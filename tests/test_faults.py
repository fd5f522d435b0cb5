"""Faults injected into serving (issue 5): a killed worker, hostile messages, slow workers,
a corrupt model file, a worker declared dead that answers after all."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import wire
from engine.config import load_config
from engine.dispatch import Dispatcher, spawn_workers, stop_workers
from engine.errors import ModelError
from engine.infer.artefact import ModelArtefact
from engine.infer.backends import find_engine
from engine.server import InferenceWorker
from tests.helpers_model import expected_p_fetal, make_clip, make_model

FAST = {"serving.heartbeat_ms": 50, "serving.worker_timeout_ms": 1500, "serving.max_wait_ms": 2}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def cfg_with(**kv):
    return load_config(overrides={**FAST, **kv})


def _start_thread_worker(model, endpoint, cfg, **kw):
    w = InferenceWorker(model, endpoint, cfg=cfg, threads=1, **kw)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    return w, t


def _wait(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------------
def test_kill_9_one_of_two_workers_every_clip_still_answered_once(model, tmp_path):
    got = []
    d = Dispatcher(cfg_with(), got.append, spill_dir=tmp_path).start()
    procs = spawn_workers(model, d.endpoint, 2, delay_ms=15,
                          overrides=["serving.heartbeat_ms=50"])
    try:
        _wait(lambda: len(d.worker_info()) == 2, 60, "two workers to join")
        clips = [make_clip(i) for i in range(80)]
        for c in clips:
            d.submit(c)
        victim = procs[0]
        tag = f":{victim.pid}:"
        _wait(lambda: any(tag in w["name"] and w["inflight"] > 0 and w["answered"] > 0
                          for w in d.worker_info()), 30, "the victim to hold clips")
        os.kill(victim.pid, signal.SIGKILL)
        counts = d.close(timeout=60)
    finally:
        codes = stop_workers(procs, timeout=20)
    assert codes[0] == -signal.SIGKILL and codes[1] == 0
    by_cell = Counter(p.cell_id for p in got)
    assert sorted(by_cell) == list(range(80)) and set(by_cell.values()) == {1}
    assert not any(p.error for p in got)
    for c, p in zip(clips, sorted(got, key=lambda p: p.cell_id)):
        assert p.p_fetal == pytest.approx(expected_p_fetal(c.frames), rel=1e-5)
    assert counts["workers_dead"] == 1 and counts["resent"] >= 1
    assert counts["answered"] == counts["submitted"] == 80


# ------------------------------------------------------------------------------------------
_TEMPLATE = wire.encode_clip(make_clip(1), run="fuzz", seq=0)
_HEADER = json.loads(_TEMPLATE[0])
_json_scalar = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
                | st.floats(allow_nan=False) | st.text(max_size=6))
_json = st.recursive(_json_scalar, lambda k: st.lists(k, max_size=3)
                     | st.dictionaries(st.text(max_size=4), k, max_size=3), max_leaves=6)


@st.composite
def hostile_message(draw):
    """A malformed, truncated or oversized message, mostly close to a valid clip."""
    how = draw(st.sampled_from(["bytes", "key", "array", "truncate", "extra", "length",
                                "huge", "garbage_header", "deep"]))
    h = json.loads(json.dumps(_HEADER))
    payload = [bytes(p) for p in _TEMPLATE[1:]]
    h["seq"] = draw(st.integers(0, 10 ** 6))
    if how == "bytes":
        return draw(st.lists(st.binary(max_size=48), min_size=1, max_size=4))
    if how == "key":
        h[draw(st.sampled_from(["v", "kind", "run", "cell", "seq", "arrays", "status",
                                "features", "t0_ns"]))] = draw(_json)
    elif how == "array":
        i = draw(st.integers(0, len(payload) - 1))
        h["arrays"][i][draw(st.sampled_from(["name", "dtype", "shape"]))] = draw(_json)
    elif how == "truncate":
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    elif how == "extra":
        payload = payload + draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))
    elif how == "length":
        i = draw(st.integers(0, len(payload) - 1))
        cut = draw(st.integers(-len(payload[i]), 64).filter(lambda n: n != 0))
        payload[i] = payload[i][:cut] if cut < 0 else payload[i] + b"\0" * cut
    elif how == "huge":
        h["arrays"][0]["shape"] = [draw(st.integers(2 ** 12, 2 ** 31)) for _ in range(3)]
    elif how == "garbage_header":
        return [draw(st.binary(min_size=1, max_size=64))] + payload
    elif how == "deep":
        n = draw(st.integers(100, 100_000))
        return [b"[" * n + b"]" * n] + payload
    return [json.dumps(h).encode()] + payload


def test_worker_survives_10000_hostile_messages_with_bounded_memory(model):
    cfg = cfg_with(**{"serving.max_message_bytes": 1 << 20})
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)          # the test plays the dispatcher
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDTIMEO, 5000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker, thread = _start_thread_worker(model, f"tcp://127.0.0.1:{port}", cfg)
    ident, hello = wire.recv(router, max_bytes=1 << 20, routed=True)
    assert hello.kind == "hello"
    replies = Counter()

    def note(m):
        replies[m.kind] += 1
        if m.kind == "prediction" and m.header["error"]:
            replies["error"] += 1

    def drain():
        while True:
            try:
                _, m = wire.recv(router, max_bytes=1 << 20, routed=True, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            note(m)

    def round_trip(seq):
        clip = make_clip(seq % 1000)
        wire.send(router, wire.encode_clip(clip, run="fuzz", seq=seq), identity=ident)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if router.poll(100):
                _, m = wire.recv(router, max_bytes=1 << 20, routed=True)
                note(m)
                if m.kind == "prediction" and m.header["seq"] == seq:
                    assert not m.header["error"]
                    return m.header["p_fetal"], expected_p_fetal(clip.frames)
        pytest.fail("worker stopped answering")

    got, want = round_trip(10 ** 9)                 # warm up (sessions, allocator)
    assert got == pytest.approx(want, rel=1e-5)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    sent = [0]

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_message(), min_size=100, max_size=100))
    def blast(messages):
        for frames in messages:
            router.send_multipart([ident] + frames)
            sent[0] += 1
        drain()

    blast()
    assert sent[0] == 10_000
    got, want = round_trip(10 ** 9 + 1)             # still serving, still right
    assert got == pytest.approx(want, rel=1e-5)
    rss1 = proc.memory_info().rss
    st_ = worker.stats
    # Every hostile message was either dropped as malformed or, when its header still named a
    # clip's cell and sequence number, answered with an explicit error record.
    assert st_["malformed"] + st_["errors"] + st_["unexpected"] >= 9_000
    assert st_["errors"] == replies["error"] > 0
    assert thread.is_alive()
    assert rss1 - rss0 < 40 * 2 ** 20, f"RSS grew by {(rss1 - rss0) / 2 ** 20:.1f} MiB"
    # A frame over the socket's size limit: libzmq drops the connection, the worker reconnects
    # and keeps serving.
    router.send_multipart([ident, b"{}", b"\0" * ((1 << 20) + wire.MAX_HEADER_BYTES + 1)])
    time.sleep(0.3)
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    router.close()
    ctx.term()


def test_dispatcher_survives_hostile_peers(model, tmp_path):
    got = []
    d = Dispatcher(cfg_with(), got.append, spill_dir=tmp_path).start()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(d.endpoint)
    rng = np.random.default_rng(0)
    for i in range(1000):
        kind = i % 4
        if kind == 0:
            rogue.send_multipart([rng.bytes(int(rng.integers(1, 40)))
                                  for _ in range(int(rng.integers(1, 4)))])
        elif kind == 1:        # a forged answer for a clip that was never sent
            rogue.send_multipart(wire.encode("prediction", "x", cell=i, seq=i, p_fetal=0.9,
                                             label="fetal", probs=[0.1, 0.9], error=""))
        elif kind == 2:
            rogue.send_multipart(_TEMPLATE[:2])                   # truncated clip
        else:
            rogue.send_multipart([json.dumps({"v": 1, "kind": "credit", "run": "x",
                                              "n": "many"}).encode()])
    worker, thread = _start_thread_worker(model, d.endpoint, cfg_with())
    for i in range(10):
        d.submit(make_clip(i))
    counts = d.close(timeout=60)
    thread.join(10)
    rogue.close()
    ctx.term()
    assert sorted(p.cell_id for p in got) == list(range(10)) and not any(p.error for p in got)
    assert counts["malformed"] >= 750 and counts["answered"] == 10


# ------------------------------------------------------------------------------------------
def test_slow_worker_clips_spill_to_disk_none_lost_order_kept(model, tmp_path):
    spill = tmp_path / "spill"
    cfg = cfg_with(**{"serving.queue_capacity": 4, "serving.credits": 2,
                      "serving.max_batch": 2})
    got = []
    seen_on_disk = []
    d = Dispatcher(cfg, got.append, spill_dir=spill).start()
    worker, thread = _start_thread_worker(model, d.endpoint, cfg, delay_ms=10)
    clips = [make_clip(i) for i in range(40)]
    for c in clips:                    # cells arrive far faster than 10 ms each
        d.submit(c)
    seen_on_disk.append(len(list(spill.glob("*.npy"))))
    counts = d.close(timeout=60)
    thread.join(10)
    assert counts["spilled"] >= 20 and seen_on_disk[0] > 0
    assert [p.cell_id for p in got] == list(range(40)), "lost, duplicated or reordered clips"
    assert not any(p.error for p in got)
    for c, p in zip(clips, got):
        assert p.p_fetal == pytest.approx(expected_p_fetal(c.frames), rel=1e-5)
    assert counts["answered"] == 40 and counts["max_queue"] > 4
    assert not list(spill.iterdir()), "spill files left behind"


def test_worker_declared_dead_but_alive_its_late_answers_are_dropped(model, tmp_path):
    cfg = cfg_with(**{"serving.worker_timeout_ms": 250, "serving.credits": 4,
                      "serving.max_batch": 4})
    got = []
    d = Dispatcher(cfg, got.append, spill_dir=tmp_path).start()
    slow, t1 = _start_thread_worker(model, d.endpoint, cfg, delay_ms=400)  # 1.6 s a batch,
    _wait(lambda: len(d.worker_info()) == 1, 20, "the slow worker")      # no heartbeat
    for i in range(4):
        d.submit(make_clip(i))
    _wait(lambda: d.counts["inflight"] == 4, 20, "the slow worker to take the clips")
    fast, t2 = _start_thread_worker(model, d.endpoint, cfg)
    _wait(lambda: d.counts["answered"] == 4 and slow.stats["answered"] == 4, 20,
          "both workers to answer")
    answered_twice = slow.stats["answered"] + fast.stats["answered"] - 4
    _wait(lambda: d.counts["duplicates_dropped"] == answered_twice, 5, "the late answers")
    counts = d.close(timeout=60)
    t1.join(10)
    t2.join(10)
    assert not t1.is_alive() and not t2.is_alive(), "eos must reach every worker"
    by_cell = Counter(p.cell_id for p in got)
    assert sorted(by_cell) == list(range(4)) and set(by_cell.values()) == {1}
    assert counts["workers_dead"] >= 1 and counts["resent"] >= 1
    assert counts["duplicates_dropped"] == answered_twice >= 1


# ------------------------------------------------------------------------------------------
def test_corrupt_model_file_is_a_model_error_naming_the_file(model, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    half = tmp_path / "half.onnx"
    half.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    for bad in (junk, half):
        with pytest.raises(ModelError, match=bad.name):
            ModelArtefact.load(bad)
        with pytest.raises(ModelError, match=bad.name):
            InferenceWorker(bad, "tcp://127.0.0.1:1", cfg=cfg_with())
    r = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(junk),
                        "--connect", "tcp://127.0.0.1:1"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "junk.onnx" in r.stderr


def test_engine_for_another_gpu_or_tensorrt_is_never_picked(model, tmp_path, monkeypatch):
    import hashlib
    art = ModelArtefact.load(model)
    monkeypatch.setenv("FMH_TRT_CACHE", str(tmp_path))
    plan = tmp_path / "tiny-fp16-0123456789abcdef.plan"
    plan.write_bytes(b"an engine")
    key = {"onnx_sha256": art.sha256, "tensorrt": "10.3.0", "gpu": "NVIDIA H100",
           "compute_capability": "9.0", "precision": "fp16", "min_batch": 1, "opt_batch": 8,
           "max_batch": 8, "input_shape": [1, 8, 16, 16]}
    side = {"format": "fmh-trt-engine/1", "key": key,
            "plan_sha256": hashlib.sha256(b"an engine").hexdigest()}
    plan.with_suffix(".json").write_text(json.dumps(side))
    assert find_engine(art, "10.3.0", "NVIDIA H100", "fp16", compute_capability="9.0") == plan
    assert find_engine(art, "10.3.0", "NVIDIA A100", "fp16") is None          # another GPU
    assert find_engine(art, "10.9.0", "NVIDIA H100", "fp16") is None          # another TRT
    assert find_engine(art, "10.3.0", "NVIDIA H100", "fp32") is None
    assert find_engine(art, "10.3.0", "NVIDIA H100", "fp16", compute_capability="8.0") is None
    plan.write_bytes(b"an engine, replaced")                                   # corrupt
    assert find_engine(art, "10.3.0", "NVIDIA H100", "fp16") is None
