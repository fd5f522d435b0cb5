"""fmh serve: one inference worker that connects to a dispatcher."""
from __future__ import annotations

HELP = "run an inference worker that takes clips from a dispatcher (this host or another)"
DESCRIPTION = """Start one inference worker: it loads MODEL, connects to the dispatcher at
ENDPOINT (printed by `fmh run`, or serving.host/port), asks for clips by credit, answers each
with a prediction and leaves on end-of-stream or SIGTERM.

For a dispatcher on another host, pass --curve-keys DIR (made by `fmh keys`): the worker
authenticates with a client key and checks the dispatcher's server key."""


def add_arguments(p) -> None:
    p.add_argument("--model", default="", metavar="MODEL",
                   help="ONNX model artefact (default: model.path, else the bundled demo model)")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="dispatcher endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--backend", default=None,
                   choices=["auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda",
                            "tensorrt", "torch"],
                   help="inference backend (default: model.backend)")
    p.add_argument("--max-batch", type=int, default=None, help="largest micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="longest wait to fill a micro-batch [ms]")
    p.add_argument("--credits", type=int, default=None, help="clips this worker may hold")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="run on these CPUs only, e.g. 1 or 4-7 (fmh run pins its local "
                        "workers apart from the front end: serving.worker_cpus)")
    p.add_argument("--curve-keys", default=None, metavar="DIR",
                   help="CURVE key folder from `fmh keys` (needed off-host)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="artificial extra compute per clip [ms] (for fault tests)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="leave when this process is gone")
    p.add_argument("-v", "--verbose", action="store_true", help="log each worker event")


def run(args) -> int:
    import logging
    import signal

    from ..cli import config_from_args
    from ..errors import ConfigError
    from ..server import InferenceWorker

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s fmh serve %(levelname)s %(message)s")
    cfg = config_from_args(args)
    for name in ("max_batch", "credits"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.cpus:
        from ..dispatch import parse_cpus, pin_to
        pin_to(parse_cpus(args.cpus))          # before the model's threads exist
    if not args.connect.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"--connect {args.connect!r} must be an endpoint like tcp://HOST:PORT")
    worker = InferenceWorker(args.model or cfg.model.path or None, args.connect, cfg=cfg,
                             backend=args.backend, credits=args.credits,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             curve_keys=args.curve_keys, delay_ms=args.delay_ms,
                             threads=args.threads, parent_pid=args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    stats = worker.run()
    logging.getLogger("engine.server").info("worker done: %s", stats)
    return 0
