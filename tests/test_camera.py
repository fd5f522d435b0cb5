"""Live cameras (engine/sources/camera.py): the fetch thread, its bounded drop-oldest queue,
error forwarding and shutdown, exercised with the synthetic chip played as a camera; and the
GenICam camera against a stand-in for the harvesters API (no camera on the test machines)."""
from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from engine.config import load_config
from engine.errors import SourceError
from engine.sources import open_source
from engine.sources.camera import Camera, FrameIdUnwrapper, GenICamCamera, SourceCamera
from engine.sources.sim import SyntheticChip, SyntheticChipSource
from engine.types import Frame

N = 10


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def wait_until(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.002)


def test_sim_camera_returns_exactly_the_frames_the_simulator_wrote(cfg):
    expected, truth = SyntheticChip(cfg).render(N)
    cam = SourceCamera(SyntheticChip(cfg).frames(N), fps=cfg.camera.fps, queue_frames=64)
    assert cam.live
    with cam:
        got = list(cam.frames())
    assert [f.index for f in got] == list(truth.frame_numbers)
    np.testing.assert_array_equal(np.stack([f.image for f in got]), expected)
    assert [f.t_ns for f in got] == [round(n * 1e9 / cfg.camera.fps) for n in truth.frame_numbers]
    assert cam.queue_dropped == 0 and cam.n_errors == 0 and cam.stats.frames_read == N
    assert not cam.thread_alive


def test_sim_source_as_camera(cfg):
    """A FrameSource (the simulator's) is opened and closed by the camera around it."""
    expected, _ = SyntheticChip(cfg).render(N)
    src = SyntheticChipSource(cfg, frames=N)
    cam = SourceCamera(src, queue_frames=64)
    assert cam.shape == (cfg.camera.height, cfg.camera.width) and cam.fps == cfg.camera.fps
    with cam:
        got = list(cam.frames())
    np.testing.assert_array_equal(np.stack([f.image for f in got]), expected)
    assert src._state == "closed"


@pytest.mark.parametrize("q", [1, 16])
def test_fast_camera_slow_consumer_drops_oldest_and_counts_exactly(q):
    img = np.zeros((4, 4), np.uint8)
    numbers = [n for n in range(260) if n % 37 != 5]          # the camera lost some frames
    camera_gaps = 260 - len(numbers)
    got_first = threading.Event()

    def stream():
        yield Frame(numbers[0], 0, img)
        got_first.wait(10)                                    # consumer holds frame 0 ...
        for n in numbers[1:]:                                 # ... while the camera runs on
            yield Frame(n, n, img)

    cam = SourceCamera(stream(), queue_frames=q, shape=(4, 4))
    with cam:
        it = cam.frames()
        first = next(it)
        got_first.set()
        wait_until(lambda: cam.stream_ended)
        rest = list(it)
    read = [first.index] + [f.index for f in rest]
    assert read == [numbers[0]] + numbers[-q:]               # the newest q frames survive
    assert cam.frames_fetched == len(numbers)
    assert cam.queue_dropped == len(numbers) - 1 - q
    assert cam.stats.frames_read + cam.queue_dropped == cam.frames_fetched
    # the queue's drops are not camera gaps; the camera's own losses are
    assert cam.camera_gaps == camera_gaps == sum(1 for n in range(260) if n % 37 == 5)
    assert cam.stats.gaps == camera_gaps
    c = cam.counters()
    assert c["queue_dropped"] == cam.queue_dropped and c["frames_read"] == len(read)


class FlakyCamera(Camera):
    """Raises on every third fetch; ends after ``n`` frames."""

    def __init__(self, n, **options):
        super().__init__("flaky", **options)
        self.n, self.calls, self.sent = n, 0, 0

    @property
    def shape(self):
        return (2, 2)

    def _fetch_frame(self, timeout_s):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError(f"transfer error #{self.calls}")
        if self.sent == self.n:
            return Camera.END
        self.sent += 1
        return Frame(self.sent - 1, 0, np.full((2, 2), self.sent, np.uint8))


def test_fetch_errors_are_forwarded_not_fatal():
    seen = []
    cam = FlakyCamera(12, on_error=seen.append, queue_frames=100)
    with cam:
        got = list(cam.frames())
    assert [f.index for f in got] == list(range(12))          # every frame still arrives
    assert cam.n_errors == len(seen) == cam.calls // 3 >= 5
    assert all(isinstance(e, RuntimeError) for e in seen)
    assert list(cam.errors) == seen
    assert cam.describe()["errors"] == cam.n_errors


def test_a_failing_error_callback_does_not_stop_acquisition():
    def bad_callback(exc):
        raise ValueError("callback bug")
    cam = FlakyCamera(6, on_error=bad_callback, queue_frames=100)
    with cam:
        assert len(list(cam.frames())) == 6


def endless(fps=2000.0):
    img = np.zeros((2, 2), np.uint8)
    n = 0
    while True:
        yield Frame(n, n, img)
        n += 1


def test_shutdown_joins_the_fetch_thread():
    cam = SourceCamera(endless(), fps=2000.0, shape=(2, 2), queue_frames=8)
    cam.open()
    it = cam.frames()
    got = [next(it).index for _ in range(3)]
    assert got == sorted(set(got))                      # in order (a busy host may drop)
    thread = cam._thread
    assert thread.is_alive()
    cam.close()
    assert not thread.is_alive() and not cam.thread_alive
    cam.close()                                               # idempotent
    cam.shutdown()
    with pytest.raises(SourceError):
        cam.enable()


def test_disable_ends_frames_after_draining_the_queue():
    cam = SourceCamera(endless(), fps=2000.0, shape=(2, 2), queue_frames=1000)
    got = []
    with cam:
        for f in cam.frames():
            got.append(f.index)
            if len(got) == 5:
                cam.disable()
        fetched = cam.frames_fetched
    assert got == list(range(len(got))) and len(got) == fetched >= 5
    assert cam.queue_dropped == 0


def test_stall_timeout_raises():
    class Silent(Camera):
        shape = (2, 2)

        def _fetch_frame(self, timeout_s):
            time.sleep(min(timeout_s, 0.01))
            return None

    cam = Silent("silent", fetch_timeout_s=0.02, stall_timeout_s=0.1)
    with cam:
        with pytest.raises(SourceError, match="no frame"):
            next(iter(cam.frames()))


def test_frame_id_unwrapper():
    u = FrameIdUnwrapper()
    assert [u(i) for i in (65533, 65534, 65535, 1, 2, 4)] == [65533, 65534, 65535, 65536,
                                                              65537, 65539]
    v = FrameIdUnwrapper()
    assert [v(i) for i in (10, 11, 9, 12)] == [10, 11, 9, 12]       # jitter is not a wrap


# ---- GenICam --------------------------------------------------------------------------------

@pytest.fixture
def cti(tmp_path):
    p = tmp_path / "producer.cti"
    p.write_bytes(b"\x7fELF fake producer")
    return p


def test_genicam_without_harvesters_says_how_to_install(cti, monkeypatch):
    monkeypatch.setitem(sys.modules, "harvesters", None)
    monkeypatch.setitem(sys.modules, "harvesters.core", None)
    cam = open_source(f"genicam://{cti}?serial=ABC")
    assert isinstance(cam, GenICamCamera)
    with pytest.raises(SourceError, match=r"pip install fmh-engine\[camera\]"):
        cam.open()


def test_genicam_url_is_validated(cti, tmp_path, monkeypatch):
    cam = open_source(f"genicam://{cti}?serial=S1&roi=8,4,640,120&fps=500&exposure_us=25")
    assert cam.settings == {"serial": "S1", "offset_x": 8, "offset_y": 4, "width": 640,
                            "height": 120, "fps": 500.0, "exposure_us": 25.0,
                            "pixel_format": "Mono8"}
    assert cam.shape == (120, 640) and cam.fps == 500.0 and cam.live
    with pytest.raises(SourceError, match="colour"):
        open_source(f"genicam://{cti}?colour=1")
    with pytest.raises(SourceError, match="Mono8"):
        open_source(f"genicam://{cti}?pixel_format=Mono12")
    with pytest.raises(SourceError, match="fps"):
        open_source(f"genicam://{cti}?fps=-3")
    with pytest.raises(SourceError, match="missing.cti"):
        open_source(f"genicam://{tmp_path}/missing.cti")
    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="GENICAM_GENTL64_PATH"):
        open_source("genicam://")
    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(cti.parent))
    assert open_source("genicam://").cti_files == [str(cti)]


class _Node:
    def __init__(self, value):
        self.value = value


class LogicalErrorException(Exception):
    """genapi's error for a missing node (not an AttributeError)."""


class _NodeMap:
    def __init__(self):
        self.PixelFormat = _Node("Mono12")
        self.Width, self.Height = _Node(1024), _Node(256)
        self.OffsetX, self.OffsetY = _Node(16), _Node(16)
        self.AcquisitionFrameRateEnable = _Node(False)
        self.AcquisitionFrameRate = _Node(100.0)
        self.ExposureTimeAbs = _Node(1000.0)         # older GigE name; no ExposureTime

    def __getattr__(self, name):
        raise LogicalErrorException(f"Node not existing: {name}")


class _Buffer:
    def __init__(self, ia, frame_id, t_ns, image):
        h, w = image.shape
        comp = types.SimpleNamespace(data=image.ravel().copy(), width=w, height=h,
                                     data_format="Mono8")
        self.payload = types.SimpleNamespace(components=[comp])
        self.module = types.SimpleNamespace(frame_id=frame_id)
        self.timestamp_ns = t_ns
        self._ia = ia

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._ia.queued_back += 1
        self.payload.components[0].data[:] = 0      # the producer reuses the memory


class _ImageAcquirer:
    def __init__(self, planned):
        self.remote_device = types.SimpleNamespace(node_map=_NodeMap())
        self.planned = list(planned)
        self.num_buffers = 16
        self.calls = []
        self.queued_back = 0

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")

    def destroy(self):
        self.calls.append("destroy")

    def try_fetch(self, *, timeout):
        if self.planned:
            return _Buffer(self, *self.planned.pop(0))
        time.sleep(min(timeout, 0.005))
        return None


def fake_harvesters(monkeypatch, planned):
    log = {"files": [], "create": [], "reset": 0}
    acquirer = _ImageAcquirer([(fid, t, img) for fid, t, img in planned])

    class Harvester:
        def __init__(self):
            self.device_info_list = []

        def add_file(self, path):
            log["files"].append(path)

        def update(self):
            self.device_info_list = [{"serial_number": "S1"}]

        def create(self, search_key=None):
            log["create"].append(search_key)
            return acquirer

        def reset(self):
            log["reset"] += 1

    pkg = types.ModuleType("harvesters")
    core = types.ModuleType("harvesters.core")
    core.Harvester = Harvester
    pkg.core = core
    monkeypatch.setitem(sys.modules, "harvesters", pkg)
    monkeypatch.setitem(sys.modules, "harvesters.core", core)
    return acquirer, log


def test_genicam_camera_through_the_harvesters_api(cti, monkeypatch, cfg):
    images, _ = SyntheticChip(cfg).render(5)
    ids = [65534, 65535, 1, 3, 4]                              # wraps, and frame 2 was lost
    acquirer, log = fake_harvesters(
        monkeypatch, [(fid, 1_000_000 * k, images[k]) for k, fid in enumerate(ids)])
    cam = open_source(f"genicam://{cti}?serial=S1&width=800&height=150&fps=500&buffers=32"
                      f"&exposure_us=25")
    with cam:
        frames = []
        for f in cam.frames():
            frames.append(f)
            if len(frames) == len(ids):
                break
    assert [f.index for f in frames] == [65534, 65535, 65536, 65538, 65539]
    assert [f.t_ns for f in frames] == [1_000_000 * k for k in range(5)]
    np.testing.assert_array_equal(np.stack([f.image for f in frames]), images)   # copied out
    assert cam.stats.gaps == 1 and cam.camera_gaps == 1
    nm = acquirer.remote_device.node_map
    assert nm.PixelFormat.value == "Mono8" and (nm.Width.value, nm.Height.value) == (800, 150)
    assert nm.AcquisitionFrameRateEnable.value is True and nm.AcquisitionFrameRate.value == 500
    assert nm.ExposureTimeAbs.value == 25 and (nm.OffsetX.value, nm.OffsetY.value) == (0, 0)
    assert acquirer.num_buffers == 32 and acquirer.queued_back == 5
    assert log["files"] == [str(cti)] and log["create"] == [{"serial_number": "S1"}]
    assert acquirer.calls == ["start", "stop", "destroy"] and log["reset"] == 1
    assert cam.shape == (150, 800) and cam.fps == 500.0


def test_genicam_wrong_buffer_format_is_forwarded_not_fatal(cti, monkeypatch, cfg):
    images, _ = SyntheticChip(cfg).render(2)
    acquirer, _ = fake_harvesters(monkeypatch, [(1, 0, images[0]), (2, 1, images[1])])
    original = _Buffer.__init__

    def first_is_rgb(self, ia, fid, t, img):
        original(self, ia, fid, t, img)
        if fid == 1:
            self.payload.components[0].data_format = "RGB8"

    monkeypatch.setattr(_Buffer, "__init__", first_is_rgb)
    seen = []
    cam = GenICamCamera(str(cti), on_error=seen.append)
    with cam:
        f = next(iter(cam.frames()))
    assert f.index == 2 and len(seen) == 1 and "RGB8" in str(seen[0])
    assert acquirer.queued_back == 2                           # the bad buffer went back too


def test_genicam_missing_node_fails_open_and_releases_the_producer(cti, monkeypatch):
    acquirer, log = fake_harvesters(monkeypatch, [])
    del acquirer.remote_device.node_map.AcquisitionFrameRate      # camera without rate control
    cam = open_source(f"genicam://{cti}?fps=500")
    with pytest.raises(SourceError, match="AcquisitionFrameRate"):
        cam.open()
    assert log["reset"] == 1 and "start" not in acquirer.calls
