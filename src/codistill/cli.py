"""Command line: `codistill train | compare | groups | config | bench | reproduce | export`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .bench import NAMES as BENCHMARKS
from .errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (defaults: Fashion-MNIST, small CNN, 2 x 2 workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optim.lr=0.2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="codistill", description="Distributed codistillation with a matched "
                                     "all-reduce baseline.")
    parser.add_argument("--version", action="version", version=f"codistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (codistill COMMAND --help for each)")
    for name, help_ in (("train", "train one run (all-reduce if codistill.n_models=1)"),
                        ("compare", "all-reduce, codistillation, DiLoCo and local SGD at matched workers and updates")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--nproc", type=int, help="start N local workers (ignored under torchrun)")
        p.add_argument("--out", help="run directory (default: runs/<command>-<time>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        if name == "compare":
            p.add_argument("--link", metavar="RATE", help="also project each arm's s/step and time to the "
                           "all-reduce arm's final accuracy (less 0.5 points) with a RATE link (1gbit, 100mbit) "
                           "between model groups, beside the 1 Gbit/s, 100 and 10 Mbit/s always shown")
        if name == "train":
            p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint "
                           "(its own config.yaml; --config/--set/--out are not allowed; with --nproc N a sharded "
                           "run continues on N workers, its model batch kept)")
    _add_groups(sub)
    p = sub.add_parser("config", help="print the resolved config, or every field with --describe")
    _common(p)
    p.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    p = sub.add_parser("bench", help="performance benchmarks (docs/performance.md)")
    p.add_argument("name", choices=(*BENCHMARKS, "gpu", "all"),
                   help="gpu: the one-shot GPU validation (bench/gpu_check.py), one line per check")
    p.add_argument("--cpu", action="store_true", help="gpu only: run the checks' logic on CPU with gloo")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the table, not the speed")
    p.add_argument("--out", help="directory for <name>.md/.json and run directories (default: runs/bench-<time>)")
    p = sub.add_parser("export", help="a trained model or the ensemble as safetensors, loadable with build_model")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with a checkpoint (DDP or sharded)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", type=int, metavar="I", help="which model (default 0)")
    which.add_argument("--ensemble", action="store_true", help="every model, as one module averaging their probabilities")
    p.add_argument("--out", metavar="FILE", help="default: RUN_DIR/export/model_I.safetensors or ensemble.safetensors")
    _add_reproduce(sub)
    return parser


def _add_groups(sub) -> None:
    p = sub.add_parser("groups", help="the n model groups as n independent jobs (exchange through storage); "
                       "a failed group restarts alone")
    _common(p)
    p.add_argument("--nproc", type=int, help="workers per group (default dist.nproc / codistill.n_models)")
    p.add_argument("--out", help="parent directory of the groups' runs (default: runs/groups-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing groups directory")
    p.add_argument("--restarts", type=int, default=3, help="restarts allowed per group (default 3)")
    p.add_argument("--print-commands", action="store_true", help="print one torchrun command per group for a "
                   "cluster instead of spawning the groups here")
    p.add_argument("--nnodes", type=int, default=1, help="with --print-commands: nodes per group")


def _load_config(args):
    """The config of --config and --set, its dataset and model names checked against the registries
    (which config.py, the bottom layer, does not import)."""
    from .config import load_config
    from .tasks import check_names

    cfg = load_config(args.config, args.overrides)
    check_names(cfg)
    return cfg


def _groups(args) -> int:
    from .groups import group_config, print_summary, run_groups, torchrun_commands

    cfg = _load_config(args)
    for flag in ("nproc", "restarts", "nnodes"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "restarts" else 1):
            raise UserError(f"--{flag} must be >= {0 if flag == 'restarts' else 1}, got {value}")
    nproc = args.nproc or max(1, cfg.dist.nproc // cfg.codistill.n_models)
    out = args.out or f"runs/groups-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.print_commands:
        print(torchrun_commands(args.config, args.overrides, group_config(cfg, Path(out)), out, args.nnodes, nproc,
                                args.restarts))
        return 0
    summary = run_groups(cfg, out, nproc, args.restarts, overwrite=args.overwrite)
    print_summary(summary)
    print(f"groups summary: {out}/groups.json")
    return 0 if all(g["status"] == "finished" for g in summary["groups"]) else 1


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's findings: rows, plots, docs/results.md")
    p.add_argument("names", nargs="*", metavar="NAME", help="F1 ... F7, Beyond, Peers, PeersMT, LM, or all (none with --report)")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data and model, few steps, few variants")
    p.add_argument("--out", help="results directory (default: results; runs/reproduce-quick with --quick)")
    p.add_argument("--budget", type=float, default=1.0, help="multiply every epoch-valued setting (a reduced run)")
    p.add_argument("--variants", nargs="+", metavar="VARIANT", help="run only these variants of the named experiments")
    p.add_argument("--report", action="store_true", help="only redraw the plots and rewrite the report from the rows")
    p.add_argument("--doc", help="report path (default: docs/results.md for --out results, else OUT/results.md)")


def _reproduce(args) -> int:
    from .experiments import reproduce

    return reproduce(args.names, seeds=args.seeds, quick=args.quick, out=args.out, budget=args.budget,
                     variants=args.variants,
                     report=args.report, doc=args.doc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"codistill: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that the system refuses (permissions, full disk, ...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"codistill: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codistill: interrupted", file=sys.stderr)
        return 130


def _check_outputs(args) -> None:
    """--out (and reproduce's --doc) of every command, before anything runs or is written."""
    from .preflight import check_path

    if getattr(args, "out", None) is not None:
        if not args.out.strip():
            raise UserError("--out is empty; give a directory or leave --out out for the default")
        check_path("--out", args.out, "output")
    if getattr(args, "doc", None) is not None:
        doc = Path(args.doc)
        if not args.doc.strip() or doc.is_dir():
            raise UserError(f"--doc {args.doc!r} is not a file path; give the report's file, e.g. OUT/results.md")
        check_path("--doc's directory", str(doc.parent), "output")


def _run(args) -> int:
    _check_outputs(args)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "groups":
        return _groups(args)
    if args.command == "export":
        from .export import export

        print(export(args.run_dir, model=args.model, ensemble=args.ensemble, out=args.out))
        return 0
    if args.command == "bench" and args.name == "gpu":
        from .bench import gpu_check

        return gpu_check.main(["--out", args.out or f"runs/bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}"]
                              + (["--cpu"] if args.cpu else []))
    if args.command == "bench":
        from .bench import run_benchmarks

        run_benchmarks(args.name, quick=args.quick, out=args.out)
        return 0
    from . import config as config_mod

    if args.command == "config" and args.describe:
        if args.config or args.overrides:
            raise UserError("config --describe lists every field with its default; drop --config and --set "
                            "(codistill config --config/--set prints the resolved values)")
        print(config_mod.describe())
        return 0
    if getattr(args, "resume", None) is not None:
        given = [flag for flag, value in (("--config", args.config), ("--set", args.overrides), ("--out", args.out),
                                         ("--overwrite", args.overwrite)) if value]
        if not args.resume.strip():
            raise UserError("--resume is empty; give the run directory to continue")
        if given:
            raise UserError(f"--resume continues a run with its own config.yaml and directory; "
                            f"drop {', '.join(given)}")
        if args.nproc is not None and args.nproc <= 0:
            raise UserError(f"--nproc must be > 0, got {args.nproc}")
        from .launch import resume_config, train

        # --nproc: another number of workers (sharded runs only; the model batch is kept)
        cfg, world = resume_config(args.resume, args.nproc)
        summary = train(cfg, args.resume, nproc=world, resume=True)
        _finish(summary, args.resume)
        return 0
    link_bps = None
    if getattr(args, "link", None) is not None:  # validated before anything is trained or written
        from .cost_model import parse_link_rate

        link_bps = parse_link_rate(args.link)
    cfg = _load_config(args)
    if args.command == "config":
        print(config_mod.dump_yaml(cfg), end="")
        return 0
    if args.nproc is not None and args.nproc <= 0:
        raise UserError(f"--nproc must be > 0, got {args.nproc}")
    out = args.out or f"runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.command == "train":
        from .launch import train

        summary = train(cfg, out, overwrite=args.overwrite, nproc=args.nproc, warn=True)
        _finish(summary, out)
        return 0
    from .compare import run_compare
    from .distributed import torchrun_world_size, under_torchrun
    from .preflight import preflight

    world = torchrun_world_size() if under_torchrun() else args.nproc if args.nproc is not None else cfg.dist.nproc
    # Everything, before the comparison directory is touched (under torchrun, rank 0 may already
    # have created it: run_compare's prepare_run_dir checks it there).
    preflight(cfg, world, None if under_torchrun() else out, args.overwrite)
    run_compare(cfg, out, overwrite=args.overwrite, nproc=args.nproc, link_bps=link_bps)
    return 0


def _finish(summary: dict, out) -> None:
    """Once, from the first process: the curves as PNGs beside the run, and a line with the results."""
    from .distributed import launcher_env

    env = launcher_env()
    if not summary or (env is not None and env["RANK"] != 0):  # once, not once per torchrun process
        return
    from .plots import plot_run  # only now: training never imports matplotlib

    plot_run(out, [m["index"] for m in summary["models"]])
    accs = ", ".join(f"model {m['index']} ({m['name']}) {100 * m['val_accuracy']:.2f}%" for m in summary["models"])
    print(f"done: {summary['steps']} steps, val accuracy {accs}; run directory {out}")


def entry() -> None:
    """The `codistill` console script and `python -m codistill.cli`."""
    code = main()
    from .distributed import AGENT_VAR, exit_skipping_teardown

    if AGENT_VAR in os.environ:  # one of torchrun's workers: its job is done, see exit_skipping_teardown
        exit_skipping_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
