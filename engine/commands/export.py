"""fmh export: checkpoint -> verified ONNX artefact (-> TensorRT engine)."""
from __future__ import annotations

HELP = "export a checkpoint to a verified ONNX model (and a TensorRT engine)"
DESCRIPTION = """Export CHECKPOINT (an fmh checkpoint written by `fmh train`, or a PySlowFast
.pyth / PyTorchVideo checkpoint with --import-foreign) to an ONNX model artefact: opset >= 17,
one input `clip` (N x C x T x H x W, only N dynamic), `logits` out, fmh.* metadata
(architecture, input, sampling, normalisation, classes, threshold, validation figures). The
ONNX file is checked with onnx.checker and compared with PyTorch on reference clips through
ONNX Runtime: a worst |logit difference| above 1e-4 is an error and nothing is written.

--trt builds a TensorRT engine from the ONNX file for this GPU (FP16 by default), cached
under a key of the ONNX sha256, TensorRT version, GPU, precision and batch profile, with a
JSON sidecar; it needs an NVIDIA GPU with TensorRT.

example:
  fmh export runs/train/best.pt --onnx models/m1.onnx
  fmh export runs/train/best.pt --onnx models/m1.onnx --trt models/m1.plan --max-batch 8"""


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--onnx", required=True, metavar="OUT", help="ONNX file to write")
    p.add_argument("--trt", metavar="OUT", help="also build a TensorRT engine and copy it here")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17) [17]")
    p.add_argument("--max-batch", type=int, default=8, help="TensorRT profile max batch [8]")
    p.add_argument("--opt-batch", type=int, help="TensorRT profile optimum batch [max-batch]")
    p.add_argument("--precision", choices=["fp16", "fp32", "int8"], default="fp16",
                   help="TensorRT precision [fp16]")
    p.add_argument("--calibration", metavar="NPY",
                   help="preprocessed clips (n, C, T, H, W) float32 .npy for INT8")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed ONNX Runtime vs PyTorch |logit difference| [1e-4]")
    p.add_argument("--dynamo", action="store_true", help="use the dynamo-based ONNX exporter")
    p.add_argument("--conv3d", choices=["as2d", "none"], default="as2d",
                   help="as2d: 3D convolutions with a spatial kernel written as 2D ones over "
                        "the frames (same function, faster on ONNX Runtime CPU: 2.4x for the "
                        "demo model); none: as they "
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
        raise ConfigError("--precision int8 needs --calibration clips.npy")
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
    result = export_onnx(ckpt, args.onnx, opset=args.opset, tolerance=args.tolerance,
                         dynamo=args.dynamo, conv3d=args.conv3d)
    print(f"wrote {result.summary()}")
    print(f"model id {result.model_id}")
    for key, value in result.metadata.items():
        print(f"  {key} = {value}")
    if args.trt:
        import numpy as np

        from export.to_trt import build_engine
        from export.verify import verify
        calib = np.load(args.calibration) if args.calibration else None
        res = build_engine(args.onnx, precision=args.precision, max_batch=args.max_batch,
                           opt_batch=args.opt_batch, calibration=calib, out=args.trt)
        state = f"built in {res.seconds:.1f} s ({res.reason})" if res.built else "reused from cache"
        print(f"TensorRT engine {res.path} {state}; key {json.dumps(res.key.to_json())}")
        for row in verify(ckpt, args.onnx, engine=res.path, precision=args.precision):
            print(f"  {row}")
    return 0
