"""fmh export: checkpoint -> verified ONNX artefact (-> TensorRT engine)."""
from __future__ import annotations

HELP = "export a checkpoint to a verified ONNX model (and a TensorRT engine)"
DESCRIPTION = """Export CHECKPOINT (an fmh checkpoint written by `fmh train`, or a PySlowFast
.pyth / PyTorchVideo checkpoint with --import-foreign) to an ONNX model artefact: opset >= 17,
one input `clip` (N x C x T x H x W, only N dynamic), `logits` out, fmh.* metadata
(architecture, input, sampling, normalisation, classes, threshold, validation figures). The
ONNX file is checked with onnx.checker and compared with PyTorch on reference clips through
ONNX Runtime: a worst |logit difference| above 1e-4 is an error and nothing is written.

--int8-onnx also writes an INT8 ONNX model for ONNX Runtime's CPU (about twice as fast as
fp32 for wide models such as an R50; slower for the tiny demo model): static quantization,
8-bit ranges measured on --calibration clips (clip stores from `fmh detect` / `fmh run`, or
a .npy of preprocessed clips), then checked against PyTorch on other clips: a worst
|p(positive) difference| above --int8-tolerance is an error and nothing is written. Run
`fmh evaluate` on the INT8 file to measure its own sensitivity and specificity.

--trt builds a TensorRT engine from the ONNX file for this GPU (FP16 by default), cached
under a key of the ONNX sha256, TensorRT version, GPU, precision and batch profile, with a
JSON sidecar; it needs an NVIDIA GPU with TensorRT.

example:
  fmh export runs/train/best.pt --onnx models/m1.onnx
  fmh export runs/train/best.pt --onnx models/m1.onnx --trt models/m1.plan --max-batch 8
  fmh export runs/train/best.pt --onnx models/m1.onnx --int8-onnx models/m1.int8.onnx \
      --calibration runs/detect/d001 runs/detect/d002"""


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--onnx", required=True, metavar="OUT", help="ONNX file to write")
    p.add_argument("--trt", metavar="OUT", help="also build a TensorRT engine and copy it here")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17) [17]")
    p.add_argument("--max-batch", type=int, default=8, help="TensorRT profile max batch [8]")
    p.add_argument("--opt-batch", type=int, help="TensorRT profile optimum batch [max-batch]")
    p.add_argument("--precision", choices=["fp16", "fp32", "int8"], default="fp16",
                   help="TensorRT precision [fp16]")
    p.add_argument("--int8-onnx", metavar="OUT",
                   help="also write an INT8 ONNX model (ONNX Runtime CPU) calibrated on "
                        "--calibration clips")
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="INT8 calibration clips: clip stores (clips.h5 or their folders), or "
                        "one .npy of preprocessed clips (n, C, T, H, W) float32")
    p.add_argument("--calibration-clips", type=int, default=128,
                   help="clips drawn from the stores for calibration, and as many more "
                        "for the check [128]")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"],
                   default="minmax", help="how INT8 activation ranges are set [minmax]")
    p.add_argument("--int8-tolerance", type=float, default=0.1,
                   help="largest allowed INT8 vs PyTorch |p(positive) difference| [0.1]")
    # (export.quantize.INT8_PROB_TOLERANCE; not imported here: that module needs torch)
    p.add_argument("--int8-reduce-range", action="store_true",
                   help="7-bit INT8 weights (x86 CPUs without VNNI can saturate 8-bit ones)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed ONNX Runtime vs PyTorch |logit difference| [1e-4]")
    p.add_argument("--dynamo", action="store_true", help="use the dynamo-based ONNX exporter")
    p.add_argument("--conv3d", choices=["as2d", "frames", "none"], default="as2d",
                   help="as2d: 3D convolutions with a spatial kernel written as 2D ones over "
                        "the frames (same function, faster on ONNX Runtime CPU: 2.4x for the "
                        "demo model); frames: the whole network on frames (no layout changes "
                        "between layers; a little faster for wide models); none: as they "
                        "are [as2d]")
    p.add_argument("--import-foreign", action="store_true",
                   help="CHECKPOINT is a PySlowFast/PyTorchVideo file: convert it (grey stems)")
    p.add_argument("--alpha", type=int, help="with --import-foreign: alpha [4]")
    p.add_argument("--frames", type=int, help="with --import-foreign: fast frames [32]")
    p.add_argument("--crop", type=int, help="with --import-foreign: input size [224]")


def run(args) -> int:
    import json
    from pathlib import Path

    from ..errors import ConfigError, ModelError
    if args.opset < 17:
        raise ConfigError(f"--opset {args.opset}: must be 17 or newer")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}: must be >= 1")
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance {args.tolerance}: must be positive")
    if args.precision == "int8" and args.trt and not args.calibration:
        raise ConfigError("--precision int8 needs --calibration clips (stores or a .npy)")
    if args.int8_onnx and not args.calibration:
        raise ConfigError("--int8-onnx needs --calibration clips (stores or a .npy)")
    if args.int8_onnx and Path(args.int8_onnx).resolve() == Path(args.onnx).resolve():
        raise ConfigError(f"--int8-onnx {args.int8_onnx} is the --onnx file: give it its own")
    if args.calibration and not (args.int8_onnx or (args.trt and args.precision == "int8")):
        raise ConfigError("--calibration is for --int8-onnx or --trt with --precision int8")
    if args.calibration_clips < 1:
        raise ConfigError(f"--calibration-clips {args.calibration_clips}: must be >= 1")
    if not args.int8_tolerance > 0:
        raise ConfigError(f"--int8-tolerance {args.int8_tolerance}: must be positive")
    for c in args.calibration or ():
        if not Path(c).exists():
            raise ConfigError(f"--calibration {c}: no such file or folder")
    if not Path(args.checkpoint).is_file():
        raise ModelError(f"{args.checkpoint}: checkpoint not found")

    if args.trt:
        from export.to_trt import TensorRTToolkit
        TensorRTToolkit()          # fail before exporting when TensorRT or the GPU is missing
    from export.checkpoints import import_checkpoint, load_checkpoint
    from export.to_onnx import export_onnx

    if args.import_foreign:
        extra = {k: v for k, v in (("alpha", args.alpha or 4), ("frames", args.frames or 32),
                                   ("crop", args.crop or 224))}
        ckpt, report = import_checkpoint(args.checkpoint, in_channels=1, **extra)
        print(f"converted {args.checkpoint}: {report}")
    else:
        ckpt = load_checkpoint(args.checkpoint)
    calib = check = None
    if args.calibration:            # read first: a bad calibration set fails before any writing
        calib, check = _calibration(args, ckpt)
    result = export_onnx(ckpt, args.onnx, opset=args.opset, tolerance=args.tolerance,
                         dynamo=args.dynamo, conv3d=args.conv3d)
    print(f"wrote {result.summary()}")
    print(f"model id {result.model_id}")
    for key, value in result.metadata.items():
        print(f"  {key} = {value}")
    if args.int8_onnx:
        from export.quantize import quantize_int8
        print(f"INT8: calibrating on {len(calib)} clips, checking on {len(check)}")
        q = quantize_int8(ckpt, args.int8_onnx, calib, check=check,
                          prob_tolerance=args.int8_tolerance, method=args.calibration_method,
                          reduce_range=args.int8_reduce_range)
        print(f"wrote {q.summary()}")
    if args.trt:
        from export.to_trt import build_engine
        from export.verify import verify
        res = build_engine(args.onnx, precision=args.precision, max_batch=args.max_batch,
                           opt_batch=args.opt_batch, calibration=calib, out=args.trt)
        state = f"built in {res.seconds:.1f} s ({res.reason})" if res.built else "reused from cache"
        print(f"TensorRT engine {res.path} {state}; key {json.dumps(res.key.to_json())}")
        for row in verify(ckpt, args.onnx, engine=res.path, precision=args.precision):
            print(f"  {row}")
    return 0


def _calibration(args, ckpt):
    """(calibration clips, check clips) from ``--calibration``: a .npy of preprocessed clips
    (the check then uses the same clips), or clip stores (two disjoint random draws)."""
    from pathlib import Path

    import numpy as np

    from export.quantize import calibration_from_stores
    from export.to_onnx import metadata_for

    from ..errors import ConfigError
    paths = [Path(p) for p in args.calibration]
    npy = [p for p in paths if p.suffix == ".npy"]
    if npy:
        if len(paths) != 1:
            raise ConfigError("--calibration: give one .npy, or clip stores, not both")
        try:
            clips = np.load(npy[0], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--calibration {npy[0]}: not a readable .npy ({exc})") from None
        want = tuple(ckpt.config.input_shape)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != want or not len(clips):
            raise ConfigError(f"--calibration {npy[0]}: clips of shape {clips.shape}, expected "
                              f"(n >= 1, {', '.join(map(str, want))}) for this model")
        return clips, clips
    both = calibration_from_stores(paths, metadata_for(ckpt), n=2 * args.calibration_clips)
    if len(both) < 2:
        return both, both
    return both[0::2], both[1::2]
