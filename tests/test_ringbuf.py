"""FrameRing: exact counters in both policies, across processes, and no leaked segments."""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine.errors import SourceError
from engine.ringbuf import FrameRing, RingPeerError
from engine.types import Frame

SHAPE = (24, 40)
ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs POSIX shared memory in /dev/shm")


def pattern(index: int, shape=SHAPE) -> np.ndarray:
    """A frame whose every pixel depends on its number, so a torn frame cannot pass."""
    h, w = shape
    return ((np.arange(h * w, dtype=np.int64).reshape(h, w) * 7 + index * 13) % 251).astype(np.uint8)


def frame(index: int, shape=SHAPE) -> Frame:
    return Frame(index=index, t_ns=1000 * index + 5, image=pattern(index, shape))


def _writer(name, n, first_sleep=0.0, hold=False):
    """Child process: attach, write n frames, close the stream (or hang until killed)."""
    ring = FrameRing.attach(name)
    time.sleep(first_sleep)
    for i in range(n):
        ring.put(frame(i))
    if hold:
        time.sleep(60)
    ring.close_writer()
    ring.close()


def _spawn(target, *args):
    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _shm_exists(name: str) -> bool:
    return (SHM / name).exists()


def _wait_gone(name: str, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _shm_exists(name):
            return True
        time.sleep(0.05)
    return False


# -- across processes -------------------------------------------------------------------------

def test_block_policy_across_processes_in_order_exact_content():
    with FrameRing.create(SHAPE, slots=16, policy="block") as ring:
        child = _spawn(_writer, ring.name, 1000)
        end = time.monotonic() + 30
        while ring.stats["written"] < 16 and time.monotonic() < end:
            time.sleep(0.01)                # the writer fills the ring, then has to wait
        got = []
        for f in ring:
            assert np.array_equal(f.image, pattern(f.index)), f"frame {f.index} differs"
            assert f.t_ns == 1000 * f.index + 5
            assert not f.image.flags.writeable
            got.append(f.index)
        child.join(10)
        assert child.exitcode == 0
        assert got == list(range(1000))
        assert ring.eos and ring.get(timeout=0) is None
        st = ring.stats
        assert (st["written"], st["read"], st["dropped"], st["pending"]) == (1000, 1000, 0, 0)
        assert st["writer_waits"] > 0       # the ring did fill up
        assert st["closed"]
        assert not _shm_exists(ring.name)   # the peer attached: the name is gone already


def test_drop_oldest_exact_counters_while_reader_sleeps():
    with FrameRing.create(SHAPE, slots=16, policy="drop-oldest") as ring:
        child = _spawn(_writer, ring.name, 1000)
        child.join(20)                      # the reader "sleeps" until the writer is done
        assert child.exitcode == 0
        st = ring.stats
        assert (st["written"], st["dropped"], st["pending"]) == (1000, 984, 16)
        got = [f.index for f in ring if np.array_equal(f.image, pattern(f.index))]
        assert got == list(range(984, 1000))
        st = ring.stats
        assert (st["written"], st["read"], st["dropped"], st["pending"]) == (1000, 16, 984, 0)
        assert st["writer_waits"] == 0


def _fast_writer(name, n):
    ring = FrameRing.attach(name)
    for i in range(n):
        ring.put(frame(i))
        if i % 500 == 0:
            time.sleep(0.01)                # bursts: some frames survive, some are overwritten
    ring.close_writer()


def test_drop_oldest_concurrent_never_returns_torn_frames():
    n = 4000
    with FrameRing.create(SHAPE, slots=4, policy="drop-oldest") as ring:
        child = _spawn(_fast_writer, ring.name, n)
        last = -1
        read = 0
        for f in ring:
            assert f.index > last
            last = f.index
            assert np.array_equal(f.image, pattern(f.index)), f"torn frame {f.index}"
            assert f.t_ns == 1000 * f.index + 5
            read += 1
            if read % 3 == 0:
                time.sleep(0.0005)          # a reader slower than the writer
        child.join(10)
        st = ring.stats
        assert st["written"] == n
        assert st["read"] == read and st["read"] + st["dropped"] == n
        assert st["dropped"] > 0 and st["pending"] == 0


# -- in one process ---------------------------------------------------------------------------

def test_end_of_stream_timeouts_and_release():
    with FrameRing.create(SHAPE, slots=2, policy="block", peers=0) as ring:
        assert ring.get(timeout=0.01) is None and not ring.eos   # timed out, not the end
        assert ring.stats["reader_waits"] == 1
        # the reader role is taken by this process now; a fresh ring for the writer side
    with FrameRing.create(SHAPE, slots=2, policy="block", peers=0) as w:
        assert w.put(frame(0)) and w.put(frame(1))
        assert w.put(frame(2), timeout=0.02) is False        # full, not written, not counted
        st = w.stats
        assert (st["written"], st["dropped"], st["writer_waits"]) == (2, 0, 1)
        w.close_writer()
        with pytest.raises(SourceError, match="after close_writer"):
            w.put(frame(3))


def test_put_validates_frames():
    with FrameRing.create(SHAPE, slots=4, policy="drop-oldest", peers=0) as ring:
        with pytest.raises(SourceError, match=r"float32 \(24, 40\).*uint8 \(24, 40\)"):
            ring.put(Frame(0, 0, np.zeros(SHAPE, np.float32)))
        with pytest.raises(SourceError, match=r"uint8 \(40, 24\)"):
            ring.put(Frame(1, 0, np.zeros((40, 24), np.uint8)))
        with pytest.raises(SourceError, match="takes a Frame"):
            ring.put(np.zeros(SHAPE, np.uint8))
        assert ring.stats["written"] == 0
        ring.put(Frame(2, 0, np.asfortranarray(pattern(2))))  # any layout is copied in
        with pytest.raises(SourceError, match="cannot also be its reader"):
            ring.get()


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(0, 5), slots=4), "positive"),
    (dict(shape=(5,), slots=4), r"\(H, W\)"),
    (dict(shape=SHAPE, slots=1), "slots must be an integer >= 2"),
    (dict(shape=SHAPE, slots=4, policy="newest"), "'newest' is not one of"),
])
def test_create_rejects_bad_arguments(kwargs, match):
    with pytest.raises(SourceError, match=match):
        FrameRing.create(**kwargs)


def test_attach_errors_name_the_ring():
    with pytest.raises(SourceError, match="no frame ring named 'fmh-no-such-ring'"):
        FrameRing.attach("fmh-no-such-ring")
    ring = FrameRing.create(SHAPE, slots=4)
    with pytest.raises(SourceError, match="already exists"):
        FrameRing.create(SHAPE, slots=4, name=ring.name)
    ring.close()
    assert not _shm_exists(ring.name)
    from multiprocessing import shared_memory
    other = shared_memory.SharedMemory(name=f"fmh-test-other-{os.getpid()}", create=True,
                                       size=4096)
    try:
        with pytest.raises(SourceError, match="is not an fmh frame ring"):
            FrameRing.attach(other.name)
    finally:
        other.close()
        other.unlink()


def test_block_view_stays_valid_until_next_get():
    with FrameRing.create(SHAPE, slots=2, policy="block", peers=0) as ring:
        # a fork child inherits the mapping: no attach needed (peers=0 unlinked the name)
        ctx = mp.get_context("fork")

        def write():
            for i in range(6):
                ring.put(frame(i))
            ring.close_writer()
            os._exit(0)
        p = ctx.Process(target=write)
        p.start()
        first = ring.get(timeout=10)
        time.sleep(0.3)                     # the writer is blocked: it may not touch our slot
        assert np.array_equal(first.image, pattern(0))
        assert [f.index for f in ring] == [1, 2, 3, 4, 5]
        p.join(10)


# -- no leaked segments -----------------------------------------------------------------------

def _child(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


OWNER = """
    import sys, time, numpy as np
    from engine.ringbuf import FrameRing
    from engine.types import Frame
    ring = FrameRing.create((24, 40), slots=8, policy="drop-oldest", peers={peers})
    for i in range(20):
        ring.put(Frame(i, i, np.zeros((24, 40), np.uint8)))
    print(ring.name, flush=True)
    {tail}
"""


def test_no_leak_after_owner_writer_is_killed_with_sigkill():
    p = _child(OWNER.format(tail="time.sleep(60)", peers=1))
    name = p.stdout.readline().strip()
    assert _shm_exists(name)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert _wait_gone(name), f"/dev/shm/{name} leaked after SIGKILL"   # the resource tracker


def _hang_writer(name):
    _writer(name, 50, hold=True)


def test_reader_sees_attached_writer_die_and_nothing_leaks():
    ring = FrameRing.create(SHAPE, slots=8, policy="block")
    child = _spawn(_hang_writer, ring.name)
    got = [ring.get(timeout=20).index for _ in range(50)]
    assert got == list(range(50))
    assert not _shm_exists(ring.name)      # unlinked when the writer attached
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(SourceError, match=rf"writer process {child.pid} died .* after 50 frames"):
        ring.get(timeout=10)
    child.join(5)
    ring.close()


def _slow_reader(name):
    ring = FrameRing.attach(name)
    ring.get()
    time.sleep(60)


def test_blocked_writer_sees_reader_die():
    ring = FrameRing.create(SHAPE, slots=2, policy="block")
    child = _spawn(_slow_reader, ring.name)
    ring.put(frame(0))
    ring.put(frame(1))
    end = time.monotonic() + 30
    while ring.stats["read"] < 1 and time.monotonic() < end:   # the child got frame 0
        time.sleep(0.01)
    assert ring.put(frame(2), timeout=0.1) is False     # full while the reader holds frame 0
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(RingPeerError, match=f"reader process {child.pid} died"):
        ring.put(frame(2), timeout=10)
    child.join(5)
    ring.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_no_leak_when_owner_gets_ctrl_c_or_sigterm(sig):
    # The owner gets the default SIGINT disposition: a test run started in the background by
    # a non-interactive shell (`cmd &`, as some CI runners do) ignores SIGINT, children
    # inherit that, and Python then never raises KeyboardInterrupt.
    p = _child(OWNER.format(tail="time.sleep(60)", peers=1),
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    name = p.stdout.readline().strip()
    assert _shm_exists(name)
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert not _shm_exists(name), f"/dev/shm/{name} left after {sig.name}"
    assert "leaked" not in err              # removed by the ring itself, not the tracker


def test_no_leak_on_normal_exit_and_attach_neither_unlinks_nor_warns():
    owner = _child(OWNER.format(tail="sys.stdin.readline()", peers=2), stdin=subprocess.PIPE)
    name = owner.stdout.readline().strip()
    # a standalone process (its own resource tracker) attaches (1 of 2 peers) and exits: on
    # Python < 3.13 a tracked attach would unlink the owner's segment with a "leaked" warning
    att = _child(f"""
        from engine.ringbuf import FrameRing
        r = FrameRing.attach({name!r})
        print(r.stats["written"]); r.close()
    """)
    out, err = att.communicate(timeout=30)
    assert out.strip() == "20" and "leaked" not in err, err
    time.sleep(0.3)
    assert _shm_exists(name)
    _, err = owner.communicate("\n", timeout=20)
    assert owner.returncode == 0 and "leaked" not in err, err
    assert not _shm_exists(name)
