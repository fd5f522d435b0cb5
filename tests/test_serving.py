"""Dispatcher + inference workers over ZeroMQ: delivery, the live PUB client, CURVE, CLI."""
import importlib.util
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main as fmh
from engine.config import load_config
from engine.dispatch import Dispatcher, make_keys, spawn_workers, stop_workers
from engine.errors import ConfigError, DeliveryError
from engine.server import InferenceWorker
from engine.types import CellClip
from tests.helpers_model import expected_p_fetal, make_clip, make_model

ROOT = Path(__file__).resolve().parent.parent
FAST = {"serving.heartbeat_ms": 50, "serving.worker_timeout_ms": 1500, "serving.max_wait_ms": 2}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def cfg_with(**kv):
    return load_config(overrides={**FAST, **{k.replace("__", "."): v for k, v in kv.items()}})


class ThreadWorker:
    """An InferenceWorker in a thread of this process (its own context and socket)."""

    def __init__(self, model, endpoint, cfg, **kw):
        self.worker = InferenceWorker(model, endpoint, cfg=cfg, threads=1, **kw)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def join(self, timeout=10):
        self.thread.join(timeout)
        return not self.thread.is_alive()


def test_every_clip_answered_once_with_the_models_probability(model, tmp_path):
    cfg = cfg_with()
    got = []
    d = Dispatcher(cfg, got.append, spill_dir=tmp_path / "spill").start()
    assert d.endpoint.startswith("tcp://127.0.0.1:")
    w = ThreadWorker(model, d.endpoint, cfg)
    clips = [make_clip(i) for i in range(60)]
    bad = CellClip(cell_id=999, frames=np.zeros((8, 16, 16), np.uint8),
                   frame_indices=np.arange(8), centroids=np.zeros((3, 2), np.float32),
                   boxes=np.zeros((8, 4), np.int32), areas=np.zeros(8, np.int32))
    for c in clips[:30] + [bad] + clips[30:]:
        d.submit(c)
    counts = d.close(timeout=60)
    assert w.join(), "worker did not leave on eos"
    by_cell = Counter(p.cell_id for p in got)
    assert len(got) == 61 and set(by_cell.values()) == {1}
    preds = {p.cell_id: p for p in got}
    for c in clips:
        p = preds[c.cell_id]
        assert not p.error and p.model_id.startswith("tiny-")
        assert p.p_fetal == pytest.approx(expected_p_fetal(c.frames), rel=1e-5)
        assert p.label == ("fetal" if p.p_fetal >= 0.5 else "maternal")
        assert p.latency_ms > 0
    assert "centroids" in preds[999].error and np.isnan(preds[999].p_fetal)
    assert counts["submitted"] == counts["answered"] == 61 and counts["errors"] == 1
    assert counts["outstanding"] == 0 and counts["workers_dead"] == 0
    assert w.worker.stats["answered"] == 61
    with pytest.raises(DeliveryError, match="after close"):
        d.submit(clips[0])


def test_close_with_no_worker_answers_every_clip_with_an_error(tmp_path):
    got = []
    d = Dispatcher(cfg_with(), got.append, spill_dir=tmp_path).start()
    for i in range(5):
        d.submit(make_clip(i))
    import dataclasses
    with pytest.raises(ValueError, match="uint8"):
        d.submit(dataclasses.replace(make_clip(9), frames=np.zeros((4, 16, 16), np.float32)))
    counts = d.close(timeout=0.2)
    assert sorted(p.cell_id for p in got) == list(range(5))
    assert all(p.error == "not answered before shutdown" for p in got)
    assert counts["unanswered"] == 5 and counts["answered"] == 5


def _documented_client():
    """The python block with the subscriber in README.md (or, until the README has the
    protocol section, in .agents/PROTOCOL.md, its source text)."""
    for doc in (ROOT / "README.md", ROOT / ".agents" / "PROTOCOL.md"):
        if doc.is_file():
            blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
            found = [b for b in blocks if "def subscribe(" in b]
            if found:
                return doc, found[0]
    pytest.fail("no documented subscriber client (README.md protocol section)")


def test_readme_subscriber_runs_as_printed(model, tmp_path):
    source = (ROOT / "examples" / "subscribe.py").read_text()
    doc, block = _documented_client()
    assert block == source, f"{doc.name} must quote examples/subscribe.py verbatim"
    spec = importlib.util.spec_from_file_location("subscribe_example", ROOT / "examples" / "subscribe.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    cfg = cfg_with()
    d = Dispatcher(cfg, spill_dir=tmp_path).start()
    seen, first = [], threading.Event()

    def listen():
        for msg in example.subscribe(d.pub_endpoint, timeout_ms=20000):
            seen.append(msg)
            first.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert first.wait(10), "no stats message: subscriber not connected"   # stats every 1 s
    w = ThreadWorker(model, d.endpoint, cfg)
    for i in range(20):
        d.submit(make_clip(i))
    d.close(timeout=60)
    t.join(10)
    w.join()
    preds = [m for m in seen if m["kind"] == "prediction"]
    assert sorted(m["cell"] for m in preds) == list(range(20))
    assert all(0 <= m["p_fetal"] <= 1 and m["label"] in ("fetal", "maternal") for m in preds)
    assert seen[-1]["kind"] == "eos" and seen[-1]["counters"]["answered"] == 20


def test_curve_on_loopback_admits_only_listed_clients(model, tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys)
    other = tmp_path / "other"
    make_keys(other)                                       # a stranger's key pair
    cfg = cfg_with(serving__curve_keys=str(keys))
    got = []
    d = Dispatcher(cfg, got.append, spill_dir=tmp_path / "s", require_curve=True).start()
    stranger = ThreadWorker(model, d.endpoint, cfg_with(), curve_keys=str(other))
    d.submit(make_clip(1))
    time.sleep(0.5)
    assert d.counts["workers_seen"] == 0 and not got          # handshake refused
    stranger.worker.stop()
    w = ThreadWorker(model, d.endpoint, cfg_with(), curve_keys=str(keys))
    d.submit(make_clip(2))
    counts = d.close(timeout=30)
    assert sorted(p.cell_id for p in got) == [1, 2] and not any(p.error for p in got)
    assert counts["workers_seen"] == 1
    assert w.join() and stranger.join()


def test_off_host_binding_requires_curve_keys():
    with pytest.raises(ConfigError, match="curve_keys"):
        Dispatcher(cfg_with(serving__host="0.0.0.0"))
    with pytest.raises(ConfigError, match="curve_keys"):
        Dispatcher(cfg_with(), require_curve=True)


def test_fmh_keys_writes_server_and_client_pairs(tmp_path, capsys):
    assert fmh(["keys", "--out", str(tmp_path)]) == 0
    assert fmh(["keys", "--out", str(tmp_path), "--client", "gpu2"]) == 0
    for f in ("server/server.key", "server/server.key_secret", "clients/client.key",
              "clients/gpu2.key_secret"):
        assert (tmp_path / f).is_file()
    assert (tmp_path / "server" / "server.key_secret").stat().st_mode & 0o077 == 0
    assert fmh(["keys", "--out", str(tmp_path), "--client", "../evil"]) == 2


def test_fmh_serve_processes_serve_and_leave_on_eos(model, tmp_path):
    got = []
    d = Dispatcher(cfg_with(), got.append, spill_dir=tmp_path).start()
    procs = spawn_workers(model, d.endpoint, 1, overrides=["serving.heartbeat_ms=50"])
    for i in range(30):
        d.submit(make_clip(i))
    counts = d.close(timeout=90)
    codes = stop_workers(procs, timeout=20)
    assert codes == [0]
    assert counts["answered"] == 30 and counts["errors"] == 0
    assert sorted(p.cell_id for p in got) == list(range(30))


@pytest.mark.parametrize("n_clips, credits", [(3, 8),    # nothing more queued (backlog 0)
                                              (9, 2)])   # queued, but no credit left
def test_worker_runs_a_partial_batch_at_once_when_no_more_clips_can_come(model, tmp_path,
                                                                        n_clips, credits):
    # max_wait_ms of a minute: only the backlog hint and the credit rule let these clips be
    # answered before close() gives up after 30 s.
    cfg = cfg_with(serving__max_wait_ms=60000, serving__max_batch=8, serving__credits=credits)
    got = []
    d = Dispatcher(cfg, got.append, spill_dir=tmp_path).start()
    w = ThreadWorker(model, d.endpoint, cfg)
    for i in range(n_clips):
        d.submit(make_clip(i))
    counts = d.close(timeout=30)
    w.join()
    assert counts["unanswered"] == 0 and not any(p.error for p in got) and len(got) == n_clips


def test_fmh_serve_leaves_cleanly_on_sigterm(model, tmp_path):
    import signal
    d = Dispatcher(cfg_with(), spill_dir=tmp_path).start()
    procs = spawn_workers(model, d.endpoint, 1, overrides=["serving.heartbeat_ms=50"])
    try:
        end = time.monotonic() + 60
        while not d.worker_info() and time.monotonic() < end:
            time.sleep(0.02)
        assert d.worker_info(), "worker did not join"
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(20) == 0
        end = time.monotonic() + 10
        while d.worker_info() and time.monotonic() < end:
            time.sleep(0.02)
        assert d.worker_info() == [] and d.counts["workers_dead"] == 0   # it said bye
    finally:
        d.close(timeout=1)
        stop_workers(procs)


def test_worker_threads_follow_the_affinity_mask_not_the_machine(monkeypatch):
    """A run pinned to 2 of 16 CPUs (taskset, a container's cpuset) must not give its
    workers 15 ONNX Runtime threads."""
    from engine import dispatch
    monkeypatch.setattr(dispatch.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: {4, 5}, raising=False)
    assert dispatch.usable_cpus() == 2
    assert dispatch.worker_threads(1, reserve=1) == 1
    assert dispatch.worker_threads(1) == 2 and dispatch.worker_threads(3) == 1
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert dispatch.worker_threads(2, reserve=1) == 7


def test_cpus_split_between_front_end_and_workers(monkeypatch):
    """serving.worker_cpus: 'auto' gives local workers the upper half of the CPUs this process
    may use (at least 1), the front end the rest; 'none' and a single CPU pin nothing; a list
    must name usable CPUs and leave the front end at least one."""
    from engine import dispatch
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: {4, 5}, raising=False)
    assert dispatch.split_cpus(1) == ([4], [5])
    assert dispatch.split_cpus(2) == ([4], [5])          # two workers share the one CPU
    assert dispatch.split_cpus(1, "none") is None and dispatch.split_cpus(0) is None
    assert dispatch.split_cpus(1, "5") == ([4], [5])
    with pytest.raises(ConfigError, match=r"CPUs \[7\] are not among"):
        dispatch.split_cpus(1, "5,7")
    with pytest.raises(ConfigError, match="leaves no CPU to the front end"):
        dispatch.split_cpus(1, "4-5")
    with pytest.raises(ConfigError, match="CPU list 'two'"):
        dispatch.split_cpus(1, "two")
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert dispatch.split_cpus(1) == (list(range(8)), list(range(8, 16)))
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: {3})
    assert dispatch.split_cpus(1) is None                # nothing to split
    assert dispatch.parse_cpus("4-6, 1,5") == [1, 4, 5, 6]
    for bad in ("3-1", "1-", "0-99999999"):
        with pytest.raises(ConfigError, match="CPU list"):
            dispatch.parse_cpus(bad)
    # the config takes a number for a single CPU and rejects anything else by name
    assert load_config(None, ["serving.worker_cpus=1"]).serving.worker_cpus == "1"
    with pytest.raises(ConfigError, match="serving.worker_cpus: 'Auto' is not 'auto'"):
        load_config(None, ["serving.worker_cpus=Auto"])


def test_fmh_serve_cpus_pins_the_worker_or_names_the_bad_list(model, tmp_path):
    import os
    import subprocess
    import sys
    usable = sorted(os.sched_getaffinity(0))
    got = []
    d = Dispatcher(cfg_with(), got.append, spill_dir=tmp_path).start()
    procs = spawn_workers(model, d.endpoint, 1, cpus=[usable[-1]])
    for i in range(5):
        d.submit(make_clip(i))
    deadline = time.monotonic() + 60
    while len(got) < 5 and time.monotonic() < deadline:   # the worker is up and serving
        time.sleep(0.05)
    pinned = os.sched_getaffinity(procs[0].pid)
    d.close(timeout=60)
    assert stop_workers(procs, timeout=20) == [0] and len(got) == 5
    assert pinned == {usable[-1]}
    bad = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(model),
                          "--connect", "tcp://127.0.0.1:9", "--cpus", "1-x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "CPU list '1-x'" in bad.stderr
