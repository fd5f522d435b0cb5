"""fmh evaluate: figures of a checkpoint or an ONNX model on labelled clip stores."""
from __future__ import annotations

HELP = "evaluate a model on labelled clip stores (confusion, sensitivity, AUC, Grad-CAM)"
DESCRIPTION = """Evaluate MODEL (a training checkpoint .pt or an ONNX artefact .onnx) on the
labelled clip stores STORES (files or folders) and write DIR/evaluation.json and
DIR/evaluation.md: top-1 error, confusion matrix, fetal sensitivity and specificity at the
model's threshold (and at 0.5), ROC AUC and per-donor accuracy, for one view per cell
(the deployed protocol) and with --views multi also for the report's 10 temporal x 3 spatial
views. --gradcam N writes Grad-CAM strips (slow and fast pathway) of N clips (checkpoints
only). --mask-cell evaluates on clips with the cell blanked out: the channel-only confound
control, which must score at chance.

example:
  fmh evaluate engine/data/demo_model.onnx data/synth/val --out eval/demo
  fmh evaluate models/m1/best.pt runs/ --views single multi --gradcam 4 --out eval/m1"""


def add_arguments(p) -> None:
    p.add_argument("model", metavar="CHECKPOINT_OR_ONNX")
    p.add_argument("stores", nargs="+", metavar="STORE", help="clip stores or folders of them")
    p.add_argument("--out", metavar="DIR", help="write evaluation.json/.md here")
    p.add_argument("--labels", metavar="CSV", help="donor,label CSV (fills in/overrides)")
    p.add_argument("--views", nargs="+", default=["single"], choices=["single", "multi"],
                   help="protocols to evaluate [single]")
    p.add_argument("--threshold", type=float, help="decision threshold on p(fetal) "
                   "[the model's own]")
    p.add_argument("--mask-cell", action="store_true",
                   help="blank the cell: channel-only confound control")
    p.add_argument("--gradcam", type=int, default=0, metavar="N",
                   help="write Grad-CAM strips of N clips into DIR (checkpoints only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from ..errors import ConfigError
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold} must be in [0, 1]")
    if args.gradcam and not args.out:
        raise ConfigError("--gradcam needs --out DIR for the PNG strips")
    from train.evaluate import evaluate, write_report
    try:
        rep = evaluate(args.model, args.stores, labels=args.labels, views=args.views,
                       mask_cell=args.mask_cell, threshold=args.threshold, device=args.device,
                       batch_size=args.batch_size, progress=not args.quiet,
                       gradcam_dir=args.out if args.gradcam else None, gradcam_n=args.gradcam)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.gradcam and not rep.get("gradcam"):
        print("note: Grad-CAM needs a torch checkpoint; none written for an ONNX model")
    for v, m in rep["views"].items():
        c = m["confusion"]["matrix"]
        print(f"{v:6s} views: top-1 error {m['top1_error']:.3f}  sensitivity "
              f"{m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  AUC {m['auc']:.3f}  "
              f"(threshold {m['threshold']:.4g}; confusion [[{c[0][0]}, {c[0][1]}], "
              f"[{c[1][0]}, {c[1][1]}]], {m['n_cells']} cells)")
    if args.out:
        jp, mp = write_report(rep, args.out)
        print(f"wrote {jp} and {mp}")
    return 0
