"""What every benchmark shares: the machine it ran on, medians, tables, and its result files.

A benchmark returns a `Result`: a title, a markdown table, notes saying what the numbers mean
and whether the targets were met, and the raw numbers. `write_result` saves `<name>.md` and
`<name>.json` in the output directory; the command line also prints the markdown.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..run_log import atomic_write_text

ROOT = Path(__file__).resolve().parents[3]  # src/codistill/bench/ -> the checkout, when run from one


@dataclass
class Result:
    name: str
    title: str
    command: str
    table: str
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Command: `{self.command}`", "",
                 f"Machine: {describe_machine(self.machine)}", "", self.table, ""]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def machine_info() -> dict:
    """The facts that make a timing comparable: cores we may use, CPU model, versions, load."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_1min_at_start": load, "commit": git_commit(),
    }


def describe_machine(m: dict) -> str:
    if not m:
        return "unknown"
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    load = f", load average {m['load_1min_at_start']:.1f} at start" if m.get("load_1min_at_start") is not None else ""
    commit = f", commit {m['commit']}" if m.get("commit") else ""
    return (f"{m['nproc']} CPU cores ({m['cpu']}){gpu}, torch {m['torch']}, "
            f"Python {m['python']}{load}{commit}")


def git_commit() -> str | None:
    """The checkout's commit (+changes when tracked files differ); None for an installed package,
    even one installed inside some other git repository."""
    if not (ROOT / ".git").exists() or not (ROOT / "src" / "codistill").is_dir():
        return None
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def median(values) -> float:
    return statistics.median(values)


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1000:
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1000
    return f"{b:.1f} TB"


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out: Path, result: Result) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{result.name}.md", result.markdown())
    atomic_write_text(out / f"{result.name}.json", json.dumps(asdict(result), indent=2) + "\n")


def child_env(threads: int = 1) -> dict:
    """Environment for training processes: one intra-op thread each, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def reachable_target(best: list[float], target: float) -> float:
    """`target`, or, when a run's best accuracy (`best`, one per run) falls short of it, the highest
    level every run reaches, rounded down to 0.5 points: times to a target need a level all attain."""
    reachable = min(best) if best else target
    return target if reachable >= target else int(reachable * 200) / 200


def report_main(report: Callable[[Path], Result], json_name: str) -> None:
    """`python -m codistill.bench.NAME --report DIR`: redo a finished benchmark's files from DIR."""
    import argparse

    parser = argparse.ArgumentParser(description=report.__doc__)
    parser.add_argument("--report", required=True, type=Path, help=f"directory holding {json_name}")
    args = parser.parse_args()
    if not (args.report / json_name).is_file():
        parser.exit(2, f"codistill: error: --report {args.report}: no {json_name} there (the benchmark's output "
                       "directory holds it)\n")
    result = report(args.report)
    write_result(args.report, result)
    print(result.markdown())
