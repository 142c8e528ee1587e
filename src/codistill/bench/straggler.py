"""Stragglers: time to accuracy when one of the two emulated machines runs at half speed.

Each emulated machine's processes join a CPU cgroup of their own (`CpuLimits`): machine 0 gets
`cores` CPUs (its share of the host: nproc / 2), machine 1 the same ("even") or half of it
("straggler"): cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` where the cpu controller is mounted
as v1 (as on these machines), else cgroup v2 `cpu.max`. The launcher of each machine joins its cgroup
before it starts (its workers inherit it). Link: 1 Gbit/s, so the straggler, not the network, is
what differs.

Arms: all-reduce (every step waits for the slowest worker), codistillation with the collective
asynchronous exchange (the exchange is a rendezvous of both machines every T steps), and
codistillation through storage (`codistill.exchange=storage`: each model group is its own job on
its own machine and never waits for the other; a slow peer only makes its teacher staler), and DiLoCo
(its groups run H = T steps apart, then every worker waits for the outer all-reduce). Storage
files go through the shared filesystem, not the emulated link. Time to target is model 0's (on
machine 0, the fast one) and model 1's (on the slow machine), training clock without evaluations.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..config import dump_yaml, replace
from ..curves import first_reaching, training_clock
from ..errors import UserError
from ..run_log import atomic_write_text
from .common import Result, fmt, machine_info, markdown_table, reachable_target
from .sweep import DELAY, sweep_configs

PERIOD_US = 100_000
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
NAMES = ("codistill_machine0", "codistill_machine1")


def cgroup_version() -> int:
    if (CGROUP_V1 / "cpu.cfs_quota_us").is_file():
        return 1
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        return 2
    raise UserError("bench straggler limits CPUs with a cgroup, but no cpu controller was found (neither v1 "
                    "/sys/fs/cgroup/cpu nor v2 cpu.max); run it as root on a Linux host with cgroups")


class CpuLimits:
    """`with CpuLimits() as cg: cg.set(k, cores)`; `cg.preexec(k)` puts a child in machine k's cgroup."""

    def __enter__(self) -> "CpuLimits":
        self.version = cgroup_version()
        root = CGROUP_V1 if self.version == 1 else CGROUP_V2
        if self.version == 2:
            (root / "cgroup.subtree_control").write_text("+cpu")
        self.dirs = [root / name for name in NAMES]
        for d in self.dirs:
            d.mkdir(exist_ok=True)
        return self

    def set(self, k: int, cores: float) -> None:
        quota = int(cores * PERIOD_US)
        if self.version == 1:
            (self.dirs[k] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.dirs[k] / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.dirs[k] / "cpu.max").write_text(f"{quota} {PERIOD_US}")

    def preexec(self, k: int):
        procs = str(self.dirs[k] / "cgroup.procs")

        def join():  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return join

    def __exit__(self, *exc) -> None:
        # Our launches have exited, but helpers they started (multiprocessing's resource tracker)
        # may take a moment longer: a cgroup can be removed only once empty.
        deadline = time.monotonic() + 30
        for d in self.dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"codistill: warning: could not remove cgroup {d} (still in use)", file=sys.stderr)
                        break
                    time.sleep(0.5)


def settings(quick: bool) -> dict:
    if quick:
        return {"arms": ["allreduce", "codistill_storage"], "nproc_per_node": 1, "target": 0.5, "timeout_s": 300,
                "delay": 2, "overrides": ["data.name=digits", "model.name=cnn_tiny", "data.batch_size=16",
                                          "train.steps=20", "optim.lr=0.1", "schedule.scale_lr=false",
                                          "codistill.exchange_every=5", "codistill.exchange_delay=2",
                                          "train.eval_every=5", "train.log_every=5", "schedule.warmup_epochs=0",
                                          "schedule.milestones=[]"]}
    return {"arms": ["allreduce", "codistill", "codistill_storage", "diloco"], "nproc_per_node": 2, "target": 0.75,
            "timeout_s": 1500, "delay": DELAY,
            "overrides": ["data.name=fashion_mnist", "model.name=cnn", "data.batch_size=64", "train.steps=60",
                          "codistill.exchange_every=25", f"codistill.exchange_delay={DELAY}", "train.eval_every=10",
                          "train.log_every=10", "schedule.warmup_epochs=0.05", "schedule.milestones=[]"]}


def _storage_run(link, cfg, run_dir: Path, st: dict, limits: CpuLimits) -> list[list[dict]]:
    """Two independent jobs, model k's on machine k, exchanging through files."""
    from .netns import run_on_machines

    k = st["nproc_per_node"]
    argvs = []
    for i in (0, 1):
        job = replace(cfg, codistill__exchange="storage", codistill__exchange_dir=str(run_dir / "exchange"),
                      codistill__model_index=i, codistill__exchange_delay=0)
        path = run_dir.parent / f"{run_dir.name}_job{i}.yaml"
        atomic_write_text(path, dump_yaml(job))
        argvs.append([sys.executable, "-m", "codistill.cli", "train", "--config", str(path), "--nproc", str(k),
                      "--out", str(run_dir / f"job{i}"), "--overwrite"])
    run_on_machines(link, argvs, run_dir.parent / f"{run_dir.name}_logs", st["timeout_s"],
                    preexec={i: limits.preexec(i) for i in (0, 1)})
    return [training_clock(run_dir / f"job{i}", model=i) for i in (0, 1)]


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    from .netns import TwoMachines, torchrun_train

    st = settings(quick)
    world = 2 * st["nproc_per_node"]
    configs = sweep_configs(st["overrides"], world, ("allreduce", "codistill", "diloco"))
    out = Path(out) / "straggler"
    share = (os.cpu_count() or 2) / 2  # each emulated machine's CPUs: half the host
    records = []
    with TwoMachines(1000) as link, CpuLimits() as limits:
        limits.set(0, share)
        for condition, slow_cores in (("even", share), ("machine 1 at half speed", share / 2)):
            limits.set(1, slow_cores)
            for arm in st["arms"]:
                run_dir = out / ("even" if slow_cores == share else "straggler") / arm
                if arm == "codistill_storage":
                    evals = _storage_run(link, configs["codistill"], run_dir, st, limits)
                else:
                    cfg = configs[arm]
                    path = run_dir.parent / f"{arm}.yaml"
                    atomic_write_text(path, dump_yaml(cfg))
                    torchrun_train(link, ["--config", str(path), "--out", str(run_dir), "--overwrite"],
                                   run_dir.parent / f"{arm}_logs", st["timeout_s"], nproc_per_node=st["nproc_per_node"],
                                   preexec={i: limits.preexec(i) for i in (0, 1)})
                    n = json.loads((run_dir / "summary.json").read_text())["n_models"]
                    evals = [training_clock(run_dir, model=i) for i in range(n)]
                hits = [first_reaching(e, st["target"]) for e in evals]
                rec = {"condition": condition, "arm": arm, "cores": [share, slow_cores],
                       "s_per_step": [e[-1]["time_without_eval"] / e[-1]["step"] for e in evals],
                       "time_to_target": [h and h["time_without_eval"] for h in hits],
                       "step_at_target": [h and h["step"] for h in hits],
                       "final_val_accuracy": [e[-1]["accuracy"] for e in evals], "evals": evals}
                records.append(rec)
                print(f"{condition} {arm}: s/step {rec['s_per_step']}, time to target {rec['time_to_target']}",
                      flush=True)
    return _result(quick, st, retarget(records, st["target"]), limits.version)


def retarget(records: list[dict], target: float) -> list[dict]:
    """Times to `target`, or, if some arm's model 0 never reaches it without the straggler, to the
    highest validation accuracy every arm's model 0 reaches there (rounded down to 0.5 points)."""
    best = [max(e["accuracy"] for e in r["evals"][0]) for r in records if r["condition"] == "even"]
    t = reachable_target(best, target)
    for r in records:
        hits = [first_reaching(e, t) for e in r["evals"]]
        r.update(target=t, time_to_target=[h and h["time_without_eval"] for h in hits],
                 step_at_target=[h and h["step"] for h in hits])
    return records


def report(directory: Path) -> Result:
    """Redo the table from a finished run's straggler.json and its run directories (no training)."""
    directory = Path(directory)
    data = json.loads((directory / "straggler.json").read_text())
    quick = "--quick" in data["command"]
    for r in data["data"]["runs"]:
        if "evals" not in r:  # written before records kept their evaluations
            run_dir = directory / "straggler" / ("even" if r["condition"] == "even" else "straggler") / r["arm"]
            r["evals"] = ([training_clock(run_dir / f"job{i}", model=i) for i in (0, 1)]
                          if r["arm"] == "codistill_storage" else
                          [training_clock(run_dir, model=i) for i in range(len(r["s_per_step"]))])
    st = settings(quick)
    result = _result(quick, st, retarget(data["data"]["runs"], st["target"]), data["data"]["cgroup_version"])
    result.machine = data["machine"]
    return result


def _result(quick: bool, st: dict, records: list[dict], version: int) -> Result:
    rows, notes = [], []
    for r in records:
        even = next(x for x in records if x["arm"] == r["arm"] and x["condition"] == "even")
        t, t0 = r["time_to_target"][0], even["time_to_target"][0]
        loss = t / t0 if t and t0 else None
        rows.append([r["arm"], r["condition"], " / ".join(f"{c:g}" for c in r["cores"]),
                     " / ".join(f"{s:.3f}" for s in r["s_per_step"]),
                     " / ".join(fmt(s, "d", "-") for s in r["step_at_target"]),
                     " / ".join(fmt(s, ".1f", "not reached") for s in r["time_to_target"]),
                     fmt(loss, ".2f"), " / ".join(f"{100 * a:.2f}" for a in r["final_val_accuracy"])])
        if r["condition"] != "even":
            notes.append(f"{r['arm']}: model 0's time to target with the straggler is "
                         f"{fmt(loss, '.2f', 'not comparable (target not reached)')}x its time without"
                         + (" (target: storage exchange loses at most 10%: "
                            f"{'met' if loss is not None and loss <= 1.10 else 'missed'})"
                            if r["arm"] == "codistill_storage" else ""))
    table = markdown_table(["arm", "machines", "CPUs machine 0 / 1", "s/step model 0 / 1",
                            "step at target, model 0 / 1",
                            "time to target (s), model 0 / 1", "model 0 time vs even", "final val acc (%), model 0 / 1"],
                           rows)
    notes = [f"W = {2 * st['nproc_per_node']} workers on two emulated machines, 1 Gbit/s link; CPU limits by cgroup "
             f"v{version} ({'cpu.cfs_quota_us' if version == 1 else 'cpu.max'}); "
             f"{'digits, cnn_tiny (quick)' if quick else 'Fashion-MNIST, cnn, batch 64 per worker'}; one run per row; "
             "model 0 is on machine 0 (never slowed), model 1 on machine 1. All-reduce has one model (one column).",
             f"target: validation accuracy {100 * records[0].get('target', st['target']):.1f}% "
             f"({100 * st['target']:.0f}%, or the highest level every arm's model 0 reaches without the straggler).",
             *notes]
    return Result(name="straggler", title="Stragglers: one machine at half speed",
                  command=f"codistill bench straggler{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"target": st["target"], "runs": records, "cgroup_version": version}, machine=machine_info())


if __name__ == "__main__":  # python -m codistill.bench.straggler --report DIR: re-analyse a finished run
    from .common import report_main

    report_main(report, "straggler.json")
