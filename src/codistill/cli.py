"""Command line: `codistill train | compare | config`."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (defaults: Fashion-MNIST, small CNN, 2 x 2 workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optim.lr=0.2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train one run (all-reduce if codistill.n_models=1)"),
                        ("compare", "all-reduce vs codistillation at matched workers and updates")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--nproc", type=int, help="start N local workers (ignored under torchrun)")
        p.add_argument("--out", help="run directory (default: runs/<command>-<time>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p = sub.add_parser("config", help="print the resolved config, or every field with --describe")
    _common(p)
    p.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"codistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codistill: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from . import config as config_mod

    if args.command == "config" and args.describe:
        print(config_mod.describe())
        return 0
    cfg = config_mod.load_config(args.config, args.overrides)
    if args.command == "config":
        print(config_mod.dump_yaml(cfg), end="")
        return 0
    if args.nproc is not None and args.nproc <= 0:
        raise UserError(f"--nproc must be > 0, got {args.nproc}")
    out = args.out or f"runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.command == "train":
        from .launch import train

        summary = train(cfg, out, overwrite=args.overwrite, nproc=args.nproc)
        if summary:
            accs = ", ".join(f"{100 * m['val_accuracy']:.2f}%" for m in summary["models"])
            print(f"done: {summary['steps']} steps, val accuracy {accs}; run directory {out}")
        return 0
    from .compare import run_compare

    run_compare(cfg, out, overwrite=args.overwrite, nproc=args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
