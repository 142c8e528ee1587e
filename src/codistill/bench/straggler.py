"""Stragglers: time to accuracy when one of the two emulated machines runs at half speed.

Each emulated machine's processes join a CPU cgroup of their own (`CpuLimits`): machine 0 gets
`cores` CPUs (one per worker, at most half the host), machine 1 the same ("even") or half of it
("straggler"): cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` where the cpu controller is mounted
as v1 (as on these machines), else cgroup v2 `cpu.max`. The launcher of each machine joins its cgroup
before it starts (its workers inherit it). Link: 1 Gbit/s, so the straggler, not the network, is
what differs.

Arms: all-reduce (every step waits for the slowest worker), codistillation with the collective
asynchronous exchange (the exchange is a rendezvous of both machines every T steps), DiLoCo and local
SGD (their groups run H = T steps apart, then every worker waits for the outer all-reduce), and
independent jobs (`codistill groups`, groups.py: each model group its own job on its own machine,
exchanging through the storage exchange; it never waits for the other, a slow peer only makes its
teacher staler). The storage files go through the shared filesystem, not the emulated link. Time to
target is model 0's (on machine 0, the fast one) and model 1's (on the slow machine), training clock
without evaluations. Each (condition, arm) runs `repeats` times, the conditions interleaved within a
repeat (so a change in the host's load hits both); the table shows medians over the repeats.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from ..config import dump_yaml, replace
from ..curves import first_reaching, training_clock
from ..errors import UserError
from ..run_log import atomic_write_text
from .common import Result, fmt, machine_info, markdown_table, reachable_target, write_result
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

    def periods(self, k: int) -> tuple[int, int]:
        """(CFS periods, periods in which the quota throttled machine k) so far: whether the limit
        bound at all (on a host loaded by other jobs, contention may hold a machine below its quota)."""
        stat = dict(line.split() for line in (self.dirs[k] / "cpu.stat").read_text().splitlines() if line.strip())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

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
        return {"arms": ["allreduce", "groups"], "nproc_per_node": 1, "target": 0.5, "timeout_s": 300,
                "delay": 2, "repeats": 1, "overrides": ["data.name=digits", "model.name=cnn_tiny", "data.batch_size=16",
                                          "train.steps=20", "optim.lr=0.1", "schedule.scale_lr=false",
                                          "codistill.exchange_every=5", "codistill.exchange_delay=2",
                                          "train.eval_every=5", "train.log_every=5", "schedule.warmup_epochs=0",
                                          "schedule.milestones=[]"]}
    return {"arms": ["allreduce", "codistill", "diloco", "localsgd", "groups"], "nproc_per_node": 2,
            "target": 0.75, "timeout_s": 1500, "delay": DELAY, "repeats": 3,
            "overrides": ["data.name=fashion_mnist", "model.name=cnn", "data.batch_size=64", "train.steps=60",
                          "codistill.exchange_every=25", f"codistill.exchange_delay={DELAY}", "train.eval_every=10",
                          "train.log_every=10", "schedule.warmup_epochs=0.05", "schedule.milestones=[]"]}


def _groups_run(cfg, run_dir: Path, st: dict, limits: CpuLimits) -> list[list[dict]]:
    """`codistill groups`: two independent jobs, group k's on machine k, exchanging through files."""
    from ..groups import run_groups

    job = replace(cfg, codistill__exchange_delay=0)  # storage publishes in the background: no delay
    summary = run_groups(job, run_dir, st["nproc_per_node"], restarts=0, overwrite=True, preexec=limits.preexec)
    if any(g["status"] != "finished" for g in summary["groups"]):
        raise RuntimeError(f"codistill groups failed in {run_dir}: see its group_<i>.log files")
    return [training_clock(run_dir / f"group_{i}", model=i) for i in (0, 1)]


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    from .netns import TwoMachines, torchrun_train

    st = settings(quick)
    root = Path(out)
    world = 2 * st["nproc_per_node"]
    configs = sweep_configs(st["overrides"], world, ("allreduce", "codistill", "diloco", "localsgd"))
    out = Path(out) / "straggler"
    # Each emulated machine's CPUs: one per worker (a worker runs one thread), at most half the host;
    # on a larger host, half of it would leave the "half speed" machine more CPUs than workers.
    share = min((os.cpu_count() or 2) / 2, st["nproc_per_node"])
    records = []
    with TwoMachines(1000) as link, CpuLimits() as limits:
        limits.set(0, share)
        for repeat in range(st["repeats"]):
            for condition, slow_cores in (("even", share), ("machine 1 at half speed", share / 2)):
                limits.set(1, slow_cores)
                for arm in st["arms"]:
                    run_dir = out / f"r{repeat}" / ("even" if slow_cores == share else "straggler") / arm
                    before = [limits.periods(i) for i in (0, 1)]
                    if arm == "groups":
                        evals = _groups_run(configs["codistill"], run_dir, st, limits)
                    else:
                        path = run_dir.parent / f"{arm}.yaml"
                        atomic_write_text(path, dump_yaml(configs[arm]))
                        torchrun_train(link, ["--config", str(path), "--out", str(run_dir), "--overwrite"],
                                       run_dir.parent / f"{arm}_logs", st["timeout_s"],
                                       nproc_per_node=st["nproc_per_node"],
                                       preexec={i: limits.preexec(i) for i in (0, 1)})
                        n = json.loads((run_dir / "summary.json").read_text())["n_models"]
                        evals = [training_clock(run_dir, model=i) for i in range(n)]
                    after = [limits.periods(i) for i in (0, 1)]
                    throttled = [(a[1] - b[1]) / max(a[0] - b[0], 1) for a, b in zip(after, before)]
                    rec = {"condition": condition, "arm": arm, "repeat": repeat, "cores": [share, slow_cores],
                           "throttled": throttled,
                           "s_per_step": [e[-1]["time_without_eval"] / e[-1]["step"] for e in evals],
                           "final_val_accuracy": [e[-1]["accuracy"] for e in evals], "evals": evals,
                           "load_1min": os.getloadavg()[0]}
                    records.append(rec)
                    print(f"repeat {repeat} {condition} {arm}: s/step {rec['s_per_step']}, "
                          f"final accuracy {rec['final_val_accuracy']}", flush=True)
                    # The table so far after every run: a long run stopped early keeps its finished repeats.
                    write_result(root, _result(quick, st, retarget(records, st["target"]), limits.version))
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
        r.setdefault("repeat", 0)  # written before repeats
        if "evals" not in r:  # written before records kept their evaluations (and before repeats)
            run_dir = directory / "straggler" / ("even" if r["condition"] == "even" else "straggler") / r["arm"]
            r["evals"] = ([training_clock(run_dir / f"job{i}", model=i) for i in (0, 1)]
                          if r["arm"] == "codistill_storage" else
                          [training_clock(run_dir, model=i) for i in range(len(r["s_per_step"]))])
    st = settings(quick)
    result = _result(quick, st, retarget(data["data"]["runs"], st["target"]), data["data"]["cgroup_version"])
    result.machine = data["machine"]
    return result


LABELS = {"allreduce": "all-reduce", "codistill": "codistillation, collective exchange", "diloco": "DiLoCo",
          "localsgd": "local SGD", "groups": "independent jobs (`codistill groups`)",
          "codistill_storage": "codistillation through storage (two jobs, by hand)"}
GROUPS_TARGET = 1.05  # the fast group's time to target with the straggler, at most 5% above without


def _median(values: list) -> float | None:
    """Median of the runs that reached the target; None unless most did."""
    reached = [v for v in values if v is not None]
    return statistics.median(reached) if len(reached) * 2 > len(values) else None


def _cell(runs: list[dict], key: str, model: int) -> float | None:
    return _median([r[key][model] if model < len(r[key]) else None for r in runs])


def complete_repeats(records: list[dict]) -> list[dict]:
    """The records of the repeats that ran every (condition, arm) cell (a run stopped mid-repeat)."""
    cells = {(r["condition"], r["arm"]) for r in records}
    done = {k for k in {r.get("repeat", 0) for r in records}
            if {(r["condition"], r["arm"]) for r in records if r.get("repeat", 0) == k} == cells}
    return [r for r in records if r.get("repeat", 0) in done]


def _result(quick: bool, st: dict, records: list[dict], version: int) -> Result:
    rows, notes = [], []
    every_run = records
    partial = len(complete_repeats(records)) < len(records)
    records = complete_repeats(records) or records
    arms = list(dict.fromkeys(r["arm"] for r in records))
    conditions = list(dict.fromkeys(r["condition"] for r in records))
    repeats = len({r.get("repeat", 0) for r in records})
    for condition in conditions:
        for arm in arms:
            runs = [r for r in records if r["arm"] == arm and r["condition"] == condition]
            if not runs:  # a run stopped part-way through its first repeat
                continue
            even = [r for r in records if r["arm"] == arm and r["condition"] == "even"]
            models = range(len(runs[0]["s_per_step"]))
            t, t0 = _cell(runs, "time_to_target", 0), _cell(even, "time_to_target", 0)
            loss = t / t0 if t and t0 else None
            reached = sum(r["time_to_target"][0] is not None for r in runs)
            rows.append([LABELS.get(arm, arm), condition, " / ".join(f"{c:g}" for c in runs[0]["cores"]),
                         " / ".join(fmt(_cell(runs, "s_per_step", m), ".3f") for m in models),
                         " / ".join(fmt(_cell(runs, "step_at_target", m), ".0f", "-") for m in models),
                         " / ".join(fmt(_cell(runs, "time_to_target", m), ".1f", "not reached") for m in models)
                         + ("" if reached == len(runs) else f" ({reached}/{len(runs)} reached)"),
                         fmt(loss, ".2f"),
                         " / ".join(fmt(100 * v if v is not None else None, ".2f")
                                    for v in (_cell(runs, "final_val_accuracy", m) for m in models)),
                         " / ".join(fmt(None if v is None else 100 * v, ".0f")
                                    for v in (_median([r.get("throttled", [None] * 2)[i] for r in runs])
                                              for i in (0, 1)))])
            if condition == "even":
                continue
            per_repeat = []
            for r in sorted(runs, key=lambda r: r.get("repeat", 0)):
                e = next((x for x in even if x.get("repeat", 0) == r.get("repeat", 0)), None)
                a, b = r["time_to_target"][0], e and e["time_to_target"][0]
                per_repeat.append(fmt(a / b if a and b else None, ".2f", "-"))
            target = ""
            if arm == "groups":
                verdict = "not measured" if loss is None else "met" if loss <= GROUPS_TARGET else "missed"
                target = f" (target: at most {GROUPS_TARGET:.2f}x: {verdict})"
            ratio = "not comparable (target not reached)" if loss is None else f"{loss:.2f}x"
            notes.append(f"{LABELS.get(arm, arm)}: model 0's time to target with the straggler is {ratio} its time "
                         f"without{target}"
                         + (f"; per repeat (each against the same repeat's even run): {', '.join(per_repeat)}"
                            if repeats > 1 else ""))
    loads = [r["load_1min"] for r in records if r.get("load_1min") is not None]
    table = markdown_table(["arm", "machines", "CPUs machine 0 / 1", "s/step model 0 / 1",
                            "step at target, model 0 / 1", "time to target (s), model 0 / 1",
                            "model 0 time vs even", "final val acc (%), model 0 / 1",
                            "throttled periods (%), machine 0 / 1"], rows)
    notes = [f"W = {2 * st['nproc_per_node']} workers on two emulated machines, 1 Gbit/s link; CPU limits by cgroup "
             f"v{version} ({'cpu.cfs_quota_us' if version == 1 else 'cpu.max'}); "
             f"{'digits, cnn_tiny (quick)' if quick else 'Fashion-MNIST, cnn, batch 64 per worker'}; "
             f"{'one run per row' if repeats == 1 else f'medians of {repeats} runs per row (conditions interleaved)'}"
             "; model 0 is on machine 0 (never slowed), model 1 on machine 1. All-reduce has one model (one column)."
             + (f" Host load average (1 min) after each run: {min(loads):.1f} - {max(loads):.1f}." if loads else ""),
             "throttled periods: the share of CFS periods in which a machine's quota stopped it (cpu.stat "
             "nr_throttled / nr_periods): near 0 for machine 1 in a straggler row means contention from other jobs, "
             "not the quota, set its speed, and the row does not measure a straggler.",
             *(["partial: the runs of an unfinished repeat are left out"] if partial else []),
             f"target: validation accuracy {100 * records[0].get('target', st['target']):.1f}% "
             f"({100 * st['target']:.0f}%, or the highest level every run's model 0 reaches without the straggler).",
             *notes]
    return Result(name="straggler", title="Stragglers: one machine at half speed",
                  command=f"codistill bench straggler{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"target": st["target"], "runs": every_run, "cgroup_version": version}, machine=machine_info())


if __name__ == "__main__":  # python -m codistill.bench.straggler --report DIR: re-analyse a finished run
    from .common import report_main

    report_main(report, "straggler.json")
