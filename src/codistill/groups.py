"""`codistill groups`: n model groups as n independent jobs that never wait for each other.

Each group is its own `codistill train` job (its own process group, spawned here, or its own
torchrun on a cluster: `--print-commands`) training one model, with the teachers travelling through
the storage exchange (`codistill.exchange=storage`, storage_exchange.py). A group that fails is
restarted alone from its last checkpoint (`train --resume`), up to `--restarts` times, while the
others keep training on the teachers they have; the command ends when every group has finished or
used up its restarts, and writes one summary saying per group what happened, including how far the
other groups got while it was down (an outage ends at the restarted group's first new log line).

    OUT/config.yaml          the resolved config every group runs (model_index set per group)
    OUT/exchange/            the exchange, unless codistill.exchange_dir names another location
    OUT/group_<i>/           group i's run directory (checkpoints, metrics, summary.json)
    OUT/group_<i>.log        its output, every attempt
    OUT/groups.json          per group: status, attempts (exit codes, resumed or fresh), outages

A codistill.exchange_dir given by the user gets a sub-location per launch (`<location>/<OUT's
name>`), which must not exist yet (a launch with an --out of the same name, --overwrite included,
is refused), so two launches never read each other's publications. Unless train.checkpoint_every is
set, groups checkpoint every T steps (codistill.exchange_every): a restart repeats at most T steps.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Config, dump_yaml, replace
from .errors import UserError

GROUP_FAULTS = "CODISTILL_GROUP_FAULTS"  # tests: "1=kill@0:12,0=slow@0:0": CODISTILL_FAULT per group, first attempt only


def group_config(cfg: Config, out: Path) -> Config:
    """The config every group runs: storage exchange, its location, checkpoints for restarts."""
    c, t = cfg.codistill, cfg.train
    if c.n_models < 2 or c.method != "distill":
        raise UserError("codistill groups runs codistillation model groups as separate jobs: it needs "
                        f"codistill.n_models >= 2 and codistill.method=distill (got {c.n_models}, {c.method})")
    location = f"{c.exchange_dir.rstrip('/')}/{out.name}" if c.exchange_dir else str(out.absolute() / "exchange")
    return replace(cfg, codistill__exchange="storage", codistill__exchange_dir=location, codistill__model_index=0,
                   train__checkpoint_every=t.checkpoint_every or c.exchange_every)


@dataclass
class Group:
    index: int
    run_dir: Path
    log: Path
    attempts: list[dict] = field(default_factory=list)
    outages: list[dict] = field(default_factory=list)
    status: str = "running"
    proc: subprocess.Popen | None = None

    @property
    def metrics(self) -> Path:
        return self.run_dir / f"model_{self.index}" / "metrics.jsonl"

    def metrics_inode(self) -> int | None:
        """A resumed run rewrites metrics.jsonl (dropping what was logged after its checkpoint) under a
        new inode: how the launcher tells the restarted attempt's lines from the dead one's."""
        try:
            return self.metrics.stat().st_ino
        except OSError:
            return None

    def last_step(self) -> int:
        """The step of the group's last training log line (-1 before any)."""
        path = self.metrics
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return -1
        steps = [json.loads(line)["step"] for line in lines if '"train/loss"' in line]
        return steps[-1] if steps else -1


def _train_command(config: Path, group: Group, nproc: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "codistill.cli", "train"]
    if resume:
        return cmd + ["--resume", str(group.run_dir)]
    return cmd + ["--config", str(config), "--set", f"codistill.model_index={group.index}", "--nproc", str(nproc),
                  "--out", str(group.run_dir), "--overwrite"]


def _start(group: Group, config: Path, nproc: int, preexec: Callable[[int], Callable] | None = None) -> None:
    from .checkpoint import read_latest

    resume = bool(group.attempts) and read_latest(group.run_dir) is not None
    env = dict(os.environ)
    faults = dict(item.split("=", 1) for item in os.environ.get(GROUP_FAULTS, "").split(",") if "=" in item)
    if str(group.index) in faults and not group.attempts:  # an injected fault is one fault, not one per attempt
        env["CODISTILL_FAULT"] = faults[str(group.index)]
    with open(group.log, "a") as log:
        log.write(f"--- attempt {len(group.attempts) + 1} ({'resume' if resume else 'fresh'}) ---\n")
        log.flush()
        group.proc = subprocess.Popen(_train_command(config, group, nproc, resume), stdout=log,
                                      stderr=subprocess.STDOUT, env=env,
                                      preexec_fn=preexec(group.index) if preexec else None)
    group.attempts.append({"mode": "resume" if resume else "fresh",
                           "from_step": read_latest(group.run_dir)["step"] if resume else 0,
                           "start": time.time(), "exit": None})


def run_groups(cfg: Config, out: str | Path, nproc: int, restarts: int, overwrite: bool = False,
               poll_s: float = 0.5, preexec: Callable[[int], Callable] | None = None) -> dict:
    """Train the groups to the end (each restarted alone up to `restarts` times); returns the summary.
    `preexec(i)`: run in group i's launch before it starts, every attempt (bench straggler puts group
    i on emulated machine i by joining its CPU cgroup there)."""
    from .launch import preflight
    from .run_log import atomic_write_text, check_run_dir, prepare_run_dir, write_json

    out = Path(out)
    named = cfg.codistill.exchange_dir is not None
    cfg = group_config(cfg, out)
    from .exchange_store import Store
    from .faults import parse_fault

    for i in range(cfg.codistill.n_models):  # everything checked before anything is created
        preflight(replace(cfg, codistill__model_index=i), nproc)
    location = cfg.codistill.exchange_dir
    if named and Store(location).existed():  # --overwrite replaces OUT, not a location elsewhere
        raise UserError(f"codistill.exchange_dir: {location} already holds an earlier launch's publications "
                        f"(one with an --out named {out.name}), which these groups would take as their peers': "
                        "choose another --out, or remove that location")
    for item in os.environ.get(GROUP_FAULTS, "").split(","):
        parse_fault(item.partition("=")[2])
    check_run_dir(out, overwrite)
    prepare_run_dir(out, overwrite)
    config = out / "config.yaml"
    atomic_write_text(config, dump_yaml(cfg))
    groups = [Group(i, out / f"group_{i}", out / f"group_{i}.log") for i in range(cfg.codistill.n_models)]
    for g in groups:
        _start(g, config, nproc, preexec)
    try:
        while any(g.status == "running" for g in groups):
            time.sleep(poll_s)
            for g in groups:
                _watch(g, groups, config, nproc, restarts, preexec)
    finally:
        for g in groups:
            if g.proc is not None and g.proc.poll() is None:
                g.proc.terminate()
    summary = {"exchange_dir": cfg.codistill.exchange_dir, "restarts_allowed": restarts,
               "groups": [_report(g) for g in groups]}
    write_json(out / "groups.json", summary)
    return summary


def _watch(g: Group, groups: list[Group], config: Path, nproc: int, restarts: int,
           preexec: Callable[[int], Callable] | None) -> None:
    outage = g.outages[-1] if g.outages and "back" not in g.outages[-1] else None
    if (outage is not None and g.metrics_inode() != outage["metrics_inode"]
            and g.last_step() > g.attempts[-1]["from_step"]):
        outage["back"] = time.time()  # the restarted group logged a new step
        outage["others_steps_while_down"] = {h.index: h.last_step() - outage["others_at_failure"][h.index]
                                             for h in groups if h is not g}
    if g.status != "running" or g.proc is None or g.proc.poll() is None:
        return
    code, g.proc = g.proc.returncode, None
    g.attempts[-1].update(exit=code, end=time.time())
    if code == 0:
        g.status = "finished"
        return
    print(f"codistill: group {g.index} exited with status {code} (attempt {len(g.attempts)}); "
          f"see {g.log}", file=sys.stderr, flush=True)
    if len(g.attempts) > restarts:
        g.status = "failed"
        return
    g.outages.append({"down": time.time(), "at_step": g.last_step(), "metrics_inode": g.metrics_inode(),
                      "others_at_failure": {h.index: h.last_step() for h in groups if h is not g}})
    _start(g, config, nproc, preexec)


def _report(g: Group) -> dict:
    report = {"index": g.index, "run_dir": str(g.run_dir), "status": g.status, "attempts": g.attempts,
              "restarts": len(g.attempts) - 1, "outages": g.outages}
    summary = g.run_dir / "summary.json"
    if g.status == "finished" and summary.is_file():
        s = json.loads(summary.read_text())
        report.update(steps=s["steps"], val_accuracy=s["models"][0]["val_accuracy"],
                      wall_seconds=s["wall_seconds"], storage=s.get("storage"))
    return report


def print_summary(summary: dict) -> None:
    for g in summary["groups"]:
        line = f"group {g['index']}: {g['status']} after {len(g['attempts'])} attempt(s)"
        if g["status"] == "finished":
            line += (f", {g['steps']} steps, val accuracy {100 * g['val_accuracy']:.2f}%, "
                     f"storage wait {100 * g['storage']['wait_s'] / max(g['wall_seconds'], 1e-9):.2f}% of its time")
        for o in g["outages"]:
            if "back" in o:
                others = ", ".join(f"group {h} +{n} steps" for h, n in o["others_steps_while_down"].items())
                line += f"; down {o['back'] - o['down']:.0f} s from step {o['at_step']} (meanwhile {others})"
        print(line)


def torchrun_commands(args_config: str | None, overrides: list[str], cfg: Config, out: str, nnodes: int,
                      nproc_per_node: int, restarts: int) -> str:
    """One torchrun per group, to run on each of that group's nodes (HOST_<i>: the group's first node)."""
    c = cfg.codistill
    lines = [f"# {c.n_models} independent groups exchanging through {c.exchange_dir} (a location every node "
             "must reach: a shared path or a URL); run each group's line on each of its nodes, with HOST_<i> its "
             "first node. torchrun restarts a failed group alone; the others keep training."]
    base = (["--config", args_config] if args_config else []) + [a for o in overrides for a in ("--set", o)]
    for i in range(c.n_models):
        sets = ["--set", "codistill.exchange=storage", "--set", f"codistill.exchange_dir={c.exchange_dir}",
                "--set", f"codistill.model_index={i}", "--set", f"train.checkpoint_every={cfg.train.checkpoint_every}"]
        cmd = ["torchrun", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"HOST_{i}:29500", "--rdzv-id", f"group_{i}", "--max-restarts", str(restarts),
               "$(which codistill)", "train", *base, *sets, "--out", f"{out}/group_{i}"]
        lines.append(" ".join(a if a.startswith("$(") else shlex.quote(a) for a in cmd))
    return "\n".join(lines)
