"""Do both groups of `codistill groups` finish within seed noise of an uninterrupted run after one
group's worker is killed with SIGKILL mid-run? (issue 28; numbers in docs/reliability.md)

For each seed: the groups uninterrupted, and the same seed with group 1's worker killed after
`--kill-at` steps (`CODISTILL_GROUP_FAULTS`; the launcher restarts it from its last checkpoint).
One row per run in OUT/rows.jsonl (a rerun skips the runs already there); the table compares each
group's final accuracy, killed minus uninterrupted for the same seed, with the seed-to-seed spread
of the uninterrupted runs.

    python scripts/groups_fault_accuracy.py --out runs/groups_fault --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run_groups(out: Path, seed: int, kill_at: int | None, args) -> dict:
    run = out / f"{'killed' if kill_at else 'uninterrupted'}_seed{seed}"
    cmd = [sys.executable, "-m", "codistill.cli", "groups", "--config", args.config, "--set", f"train.seed={seed}",
           "--set", "train.progress=false", *[a for s in args.set for a in ("--set", s)], "--nproc", "1",
           "--restarts", "1", "--out", str(run), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODISTILL_GROUP_FAULTS": f"1=kill@0:{kill_at}" if kill_at else ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"codistill: error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    summary = json.loads((run / "groups.json").read_text())
    groups = []
    for g in summary["groups"]:
        s = json.loads((Path(g["run_dir"]) / "summary.json").read_text())
        groups.append({"val_accuracy": s["models"][0]["val_accuracy"], "test_accuracy": s["models"][0]["test_accuracy"],
                       "steps": s["steps"], "restarts": g["restarts"],
                       # the step of the peer's weights the group ended distilling from (0: never a trained one)
                       "teacher_step": min(s["teacher_steps"].values()),
                       "outages": [{k: o.get(k) for k in ("at_step", "others_at_failure", "others_steps_while_down")}
                                   | {"seconds": o["back"] - o["down"] if "back" in o else None}
                                   for o in g["outages"]]})
    return {"seed": seed, "killed_at": kill_at, "groups": groups}


def table(rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["killed_at"] is not None): r for r in rows}
    lines = ["| group | metric | uninterrupted, per seed (%) | killed, per seed (%) | killed - uninterrupted, per seed "
             "(points) | mean difference | seed-to-seed range, uninterrupted (points) | peer's step in the final "
             "teacher, uninterrupted / killed, per seed |", "|" + "---|" * 8]
    for g in (0, 1):
        for metric in ("val_accuracy", "test_accuracy"):
            base = [100 * by[s, False]["groups"][g][metric] for s in seeds if (s, False) in by]
            killed = [100 * by[s, True]["groups"][g][metric] for s in seeds if (s, True) in by]
            diffs = [100 * (by[s, True]["groups"][g][metric] - by[s, False]["groups"][g][metric])
                     for s in seeds if (s, True) in by and (s, False) in by]
            lines.append(f"| {g} | {metric.replace('_', ' ')} | {', '.join(f'{v:.2f}' for v in base)} | "
                         f"{', '.join(f'{v:.2f}' for v in killed)} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                         f"{statistics.mean(diffs):+.2f} | {max(base) - min(base):.2f} | "
                         + ", ".join(f"{by[s, False]['groups'][g].get('teacher_step', '?')} / "
                                     f"{by[s, True]['groups'][g].get('teacher_step', '?')}"
                                     for s in seeds if (s, True) in by and (s, False) in by) + " |"
                         if diffs else "")
    return "\n".join(line for line in lines if line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", default="configs/digits_tiny.yaml")
    parser.add_argument("--kill-at", type=int, default=500, help="group 1's worker is killed after this step")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    for seed in range(args.seeds):
        for kill_at in (None, args.kill_at):
            if any(r["seed"] == seed and r["killed_at"] == kill_at for r in rows):
                continue
            row = run_groups(args.out, seed, kill_at, args)
            rows.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed} {'killed at ' + str(kill_at) if kill_at else 'uninterrupted'}: "
                  f"{[round(100 * g['test_accuracy'], 2) for g in row['groups']]} test accuracy (%)", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
