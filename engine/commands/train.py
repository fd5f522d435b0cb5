"""fmh train: train SlowFast (or the single-frame baseline) on labelled clip stores."""
from __future__ import annotations

HELP = "train a classifier on labelled clip stores (donor-level splits, report recipe)"
DESCRIPTION = """Train on clip stores (clips.h5 from `fmh detect`, one per donor) and write
DIR/best.pt (best on validation, with a decision threshold for --target-sensitivity),
DIR/last.pt (resumed automatically), DIR/log.csv, DIR/split.json and DIR/summary.json.

STORES are clips.h5 files or folders searched for *.h5. Labels come from each store's
`label` attribute or from --labels CSV (donor,label). Donors are split 70/20/10 with the
same number of fetal and maternal donors in validation and test.

Defaults are the report's recipe (SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 8,
warm-up + cosine; SlowFast R18, alpha 8, beta 1/8, tau 8) at 64x64 px, 1 channel, 32 frames.

example:
  fmh train runs/ --out models/m1 --epochs 60
  fmh train runs/ --out models/gpu --device cuda --arch slowfast_r50 --epochs 280"""


def add_arguments(p) -> None:
    p.add_argument("stores", nargs="+", metavar="STORE", help="clip stores or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumes there)")
    p.add_argument("--labels", metavar="CSV", help="donor,label CSV (fills in/overrides)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="slowfast_r18",
                   choices=["slowfast_r18", "slowfast_r50", "slowfast_r101", "frame2d"],
                   help="network (frame2d: single-frame 2D baseline) [%(default)s]")
    m.add_argument("--width", type=int, default=64, help="slow stem channels [%(default)s]")
    m.add_argument("--alpha", type=int, default=8, help="Fast/Slow frame ratio [%(default)s]")
    m.add_argument("--beta-inv", type=int, default=8, help="Slow/Fast channel ratio [%(default)s]")
    m.add_argument("--tau", type=int, default=8, help="Slow temporal stride [%(default)s]")
    m.add_argument("--fusion-kernel", type=int, default=5, help="[%(default)s]")
    m.add_argument("--dropout", type=float, default=0.5, help="[%(default)s]")
    m.add_argument("--frames", type=int, default=32, help="input frames T [%(default)s]")
    m.add_argument("--size", type=int, default=64, help="input height = width [px] [%(default)s]")
    m.add_argument("--crop", default="fixed", choices=["fixed", "bbox-resize"],
                   help="how the stores' clips were cut (recorded in the model) [%(default)s]")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=30, help="[%(default)s]")
    o.add_argument("--batch-size", type=int, default=8, help="[%(default)s]")
    o.add_argument("--lr", type=float, default=0.1, help="[%(default)s]")
    o.add_argument("--momentum", type=float, default=0.9, help="[%(default)s]")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="[%(default)s]")
    o.add_argument("--warmup-epochs", type=float, default=2.0, help="[%(default)s]")
    o.add_argument("--balance", default="loss", choices=["loss", "sampler", "none"],
                   help="class weighting in the loss, balanced sampling, or none [%(default)s]")
    d = p.add_argument_group("data")
    d.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.2, 0.1),
                   metavar=("TRAIN", "VAL", "TEST"), help="donor fractions [0.7 0.2 0.1]")
    d.add_argument("--no-augment", action="store_true", help="no augmentation")
    d.add_argument("--mask-cell", action="store_true",
                   help="blank the cell (channel-only confound control)")
    d.add_argument("--min-frames", type=int, default=1, help="skip shorter clips [%(default)s]")
    d.add_argument("--max-clips-per-donor", type=int, default=0,
                   help="training clips kept per donor (0: all) [%(default)s]")
    p.add_argument("--target-sensitivity", type=float, default=0.9,
                   help="fetal sensitivity the decision threshold is set for [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [%(default)s]")
    p.add_argument("--no-resume", action="store_true", help="start over even if DIR/last.pt exists")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch as an interruption would (resume later)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from(args):
    from train.loop import TrainConfig
    return TrainConfig(
        arch=args.arch, width=args.width, alpha=args.alpha, beta_inv=args.beta_inv, tau=args.tau,
        fusion_kernel=args.fusion_kernel, dropout=args.dropout, frames=args.frames,
        size=args.size, crop=args.crop, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, balance=args.balance,
        fractions=tuple(args.fractions), augment=not args.no_augment, mask_cell=args.mask_cell,
        min_frames=args.min_frames, max_clips_per_donor=args.max_clips_per_donor,
        target_sensitivity=args.target_sensitivity,
        seed=args.seed, device=args.device)


def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    try:
        from train.loop import train
        cfg = config_from(args)
    except ValueError as exc:
        raise ConfigError(f"fmh train: {exc}") from None
    try:
        summary = train(args.stores, args.out, cfg, labels=args.labels,
                        resume=not args.no_resume, progress=not args.quiet,
                        stop_after=args.stop_after)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out)
    if "stopped_after" in summary:
        print(f"stopped after epoch {summary['stopped_after']} of {cfg.epochs}; "
              f"{out / 'last.pt'} resumes, {out / 'best.pt'} is the best so far")
        return 0
    v = summary.get("val", {})
    t = summary.get("test", {})
    print(f"best epoch {summary['best_epoch']}, threshold {summary['threshold']:.4g}")
    for name, m in (("validation", v), ("test", t)):
        if m:
            print(f"{name:10s}: sensitivity {m['sensitivity']:.3f} specificity "
                  f"{m['specificity']:.3f} AUC {m['auc']:.3f} top-1 error {m['top1_error']:.3f} "
                  f"({m['n_cells']} cells)")
    print(f"wrote {out / 'best.pt'}, {out / 'log.csv'}, {out / 'summary.json'}")
    return 0
