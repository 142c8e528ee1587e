"""Where codistillation pays: time to accuracy across link rates and model profiles, and the cost model
checked on every measured cell.

Two emulated machines (`netns.TwoMachines`, as `bench slow_network`), each with W/2 workers; the link
is shaped with tc tbf to each rate of RATES in turn. Arms (matched workers and updates,
`arms.arm_configs`): all-reduce (every step's gradient ring crosses the link), codistillation
with the asynchronous, hierarchical exchange (model k's group on machine k: only the exchange crosses),
DiLoCo and local SGD (an outer all-reduce over the link every H = T steps).

Every finished cell is appended to `<out>/sweep/cells.jsonl`; a rerun into the same `--out` skips the
cells recorded there (an interrupted sweep resumes; a new arm is added without measuring the others
again). Delete the file to measure everything afresh.

Two model profiles:
- cnn: the small CNN, compute-heavy per byte (8.5 MFLOP per sample forward for 1.7 MB of gradient);
- wide_mlp: a 784-512-512-10 MLP, 0.67 M parameters (2.7 MB) for 1.3 MFLOP per sample forward: about 10x
  the bytes per FLOP of the cnn. What decides whether a link hurts is the link demand, the gradient
  bytes a worker must move per second of its own computation; the table reports it, measured. On this
  CPU the MLP demands a few hundred Mbit/s, the order of ResNet-50 or a Transformer on GPUs demanding
  tens of Gbit/s of a 10 - 25 Gbit/s inter-node link: the ratio of demand to link rate, not either
  alone, sets the regime (docs/performance.md gives the numbers).

Per profile, a calibration cell first runs each arm on the unshaped link (veth without tbf); its
training clock per step, minus its link time at the throughput measured there, is that arm's compute
per step (own step, teacher forwards, local all-reduce). The cost model (`codistill.cost_model`) then
predicts every shaped cell from that compute, the model's gradient and state bytes (its own tensors),
and the nominal rate: nothing is fitted per cell. Validation: predicted vs measured s/step and time
to target per cell, and their median absolute relative error (target <= 15%).

Outputs per cell: s/step, link bytes per step (veth counters, both directions, TCP/IP included),
updates and seconds to the target accuracy, accuracy at a fixed wall-clock budget (the all-reduce
arm's whole training time in the calibration cell), and the cost model's predictions; one plot of
time to target vs link rate per profile.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import cost_model as cm
from ..arms import arm_configs
from ..config import Config, dump_yaml, load_config, replace
from ..curves import first_reaching, training_clock
from ..models import build_model
from ..run_log import atomic_write_text
from .common import Result, fmt, fmt_bytes, machine_info, markdown_table, reachable_target

RATES = (1000, 100, 25, 10)
ARMS = ("allreduce", "codistill", "diloco", "localsgd")
DELAY = 10  # asynchronous exchange: the transfer runs during the D steps after it starts
TARGET_ERROR = 0.15

PROFILES = {
    "cnn": ["model.name=cnn"],
    "wide_mlp": ["model.name=mlp", "model.options={hidden: 512, depth: 2}"],
}


def settings(quick: bool) -> dict:
    if quick:  # checks the machinery, the tables and the plot, not the speeds (local SGD's cells are
        # DiLoCo's code path with a plain outer step: left out to keep the suite short)
        return {"rates": [100], "arms": ("allreduce", "codistill", "diloco"), "profiles": {"cnn": ["model.name=cnn_tiny"]}, "nproc_per_node": 1, "delay": 2,
                "target": 0.5, "timeout_s": 300,
                "overrides": ["data.name=digits", "data.batch_size=16", "train.steps=20", "optim.lr=0.1",
                              "schedule.scale_lr=false", "codistill.exchange_every=5",
                              "codistill.exchange_delay=2", "train.eval_every=5", "codistill.exchange_hierarchical=true",
                              "train.log_every=5", "schedule.warmup_epochs=0", "schedule.milestones=[]"]}
    return {"rates": list(RATES), "arms": ARMS, "profiles": PROFILES, "nproc_per_node": 2, "delay": DELAY, "target": 0.75,
            "timeout_s": 1500,
            "overrides": ["data.name=fashion_mnist", "data.batch_size=64", "train.steps=60",
                          "codistill.exchange_every=25", f"codistill.exchange_delay={DELAY}",
                          "codistill.exchange_hierarchical=true",
                          "train.eval_every=10", "train.log_every=10", "schedule.warmup_epochs=0.05",
                          "schedule.milestones=[]"]}


def sweep_configs(overrides: list[str], world: int, arms: tuple[str, ...]) -> dict[str, Config]:
    cfg = load_config(None, ["train.progress=false", "dist.threads=1", f"compare.arms=[{', '.join(arms)}]",
                             *overrides])
    configs = dict(arm_configs(cfg, world))
    for arm in ("allreduce", "diloco", "localsgd"):  # no asynchronous exchange: the delay stays 0
        if arm in configs:
            configs[arm] = replace(configs[arm], codistill__exchange_delay=0)
    return configs


def tensor_bytes(cfg: Config) -> dict:
    """Gradient and state bytes of the config's model, from its own tensors (as `bench bytes`)."""
    from ..data import load_dataset

    splits = load_dataset(cfg.data.name)
    model = build_model(cfg.model_names()[0], splits.num_classes, splits.input_shape, **cfg.model.options)
    return {"grad": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
            "state": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "params": sum(p.numel() for p in model.parameters())}


def run_cell(link, cfg: Config, run_dir: Path, st: dict, preexec: dict | None = None) -> dict:
    """One training run on the two machines: its clock, link bytes and accuracy over time."""
    from .netns import torchrun_train

    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    atomic_write_text(config_path, dump_yaml(cfg))
    before = link.link_bytes()
    torchrun_train(link, ["--config", str(config_path), "--out", str(run_dir), "--overwrite"],
                   run_dir.parent / f"{run_dir.name}_logs", st["timeout_s"], nproc_per_node=st["nproc_per_node"],
                   preexec=preexec)
    after = link.link_bytes()
    s = json.loads((run_dir / "summary.json").read_text())
    evals = training_clock(run_dir)
    hit = first_reaching(evals, st["target"])
    link_bytes = (after["tx"] - before["tx"]) + (after["rx"] - before["rx"])
    return {"n_models": s["n_models"], "replicas": s["replicas"], "steps": s["steps"],
            "s_per_step": evals[-1]["time_without_eval"] / evals[-1]["step"],
            "time_to_target": hit and hit["time_without_eval"], "step_at_target": hit and hit["step"],
            "evals": evals, "val_accuracy": s["models"][0]["val_accuracy"],
            "val_losses": [model["val_loss"] for model in s["models"]],
            "link_bytes_per_step": link_bytes / s["steps"]}


def crossing_replicas(cfg: Config, world: int) -> int:
    """Workers per model group whose exchange crosses the link: 1 when hierarchical."""
    return 1 if cfg.codistill.exchange_hierarchical else world // cfg.codistill.n_models


def predict(arm: str, cfg: Config, compute_s: float, m: dict, link: cm.Link) -> float | None:
    """The cost model's s/step of one arm on `link` (None for an arm it has no formula for yet)."""
    if arm == "allreduce":
        return cm.allreduce_step_s(compute_s, m["grad"], m["world"], link)
    n, r = cfg.codistill.n_models, crossing_replicas(cfg, m["world"])
    if arm.startswith("codistill"):
        return cm.codistill_run_s_per_step(compute_s, 0.0, n, r, m["state"], cfg.codistill.exchange_every,
                                           cfg.train.steps, link, cfg.codistill.exchange_delay)
    if arm in ("diloco", "localsgd"):
        return cm.outer_sync_run_s_per_step(compute_s, n, r, m["state"], cfg.codistill.exchange_every,
                                            cfg.train.steps, link)
    return None


def predicted_link_bytes(arm: str, cfg: Config, m: dict) -> float | None:
    """Both directions, on the wire, per step (evaluation traffic not included)."""
    if arm == "allreduce":
        return 2 * cm.ring_allreduce_link_bytes(m["grad"], m["world"]) * cm.WIRE_OVERHEAD
    n, steps, period = cfg.codistill.n_models, cfg.train.steps, cfg.codistill.exchange_every
    r = crossing_replicas(cfg, m["world"])
    if arm.startswith("codistill"):
        exchanges = -(-steps // period)
        return 2 * cm.exchange_link_bytes(m["state"], n, r) * exchanges / steps * cm.WIRE_OVERHEAD
    if arm in ("diloco", "localsgd"):
        start = cm.exchange_link_bytes(m["state"], n, r)  # one direction: group 0's model to the others
        outer = 2 * cm.outer_allreduce_link_bytes(m["state"], n, r) * ((steps - 1) // period + 1)
        return (start + outer) / steps * cm.WIRE_OVERHEAD
    return None


def accuracy_at(evals: list[dict], budget_s: float) -> float | None:
    within = [e for e in evals if e["time_without_eval"] <= budget_s]
    return within[-1]["accuracy"] if within else None


CELLS = "cells.jsonl"


def cell_key(record: dict) -> tuple:
    return record["profile"], record["rate_mbit"], record["arm"]


def load_cells(path: Path) -> list[dict]:
    """The cells a previous run into the same directory recorded (a torn last line is dropped)."""
    if not path.exists():
        return []
    cells = []
    for line in path.read_text().splitlines():
        try:
            cells.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return cells


def run(quick: bool = False, out: Path = Path("runs/bench"), arms: tuple[str, ...] | None = None) -> Result:
    from .netns import TwoMachines

    st = settings(quick)
    arms = tuple(arms or st["arms"])
    world = 2 * st["nproc_per_node"]
    out = Path(out) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / CELLS
    records = [r for r in load_cells(cells_path) if r.get("quick", False) == quick and r["arm"] in (*arms, "codistill_flat")]
    done = {cell_key(r) for r in records}
    if done:
        print(f"sweep: {len(done)} cells already measured in {cells_path} are kept (delete it to measure again)",
              flush=True)

    def record(rec: dict) -> None:
        rec["quick"] = quick
        records.append(rec)
        with cells_path.open("a") as f:  # one line per finished cell: the resume point
            f.write(json.dumps(rec) + "\n")

    with TwoMachines(None) as link:
        for profile, profile_sets in st["profiles"].items():
            configs = sweep_configs(st["overrides"] + profile_sets, world, arms)
            m = {**tensor_bytes(next(iter(configs.values()))), "world": world}
            compute = {r["arm"]: r["compute_s"] for r in records
                       if r["profile"] == profile and r["calibration"] and r["compute_s"] is not None}
            # Calibration: the unshaped link; what is left after its own link time is each arm's compute.
            todo = [arm for arm in configs if (profile, None, arm) not in done]
            flat_todo = ("codistill" in configs and world // configs["codistill"].codistill.n_models > 1
                         and (profile, None, "codistill_flat") not in done)
            if todo or flat_todo:
                link.shape(None)
                cal_mbit = link.measure_throughput(nbytes=20_000_000)
                cal_link = cm.Link(cal_mbit * 1e6)
            for arm in todo:
                cfg = configs[arm]
                rec = run_cell(link, cfg, out / profile / "unshaped" / arm, st)
                comm = (predict(arm, cfg, 0.0, m, cal_link) or 0.0)
                compute[arm] = max(rec["s_per_step"] - comm, 0.0)
                record({"profile": profile, "rate_mbit": None, "measured_mbit": cal_mbit, "arm": arm,
                        "calibration": True, "compute_s": compute[arm], **rec,
                        "predicted_link_bytes_per_step": predicted_link_bytes(arm, cfg, m)})
                print(f"{profile} unshaped ({cal_mbit:.0f} Mbit/s) {arm}: {rec['s_per_step']:.3f} s/step", flush=True)
            if flat_todo:
                # The hierarchical exchange checked: the same run with every replica's column crossing.
                flat = replace(configs["codistill"], codistill__exchange_hierarchical=False)
                rec = run_cell(link, flat, out / profile / "unshaped" / "codistill_flat", st)
                record({"profile": profile, "rate_mbit": None, "measured_mbit": cal_mbit,
                        "arm": "codistill_flat", "calibration": True, "compute_s": None, **rec,
                        "predicted_link_bytes_per_step": predicted_link_bytes("codistill", flat, m)})
            first = next(r for r in records if r["profile"] == profile and r["calibration"])
            budget = first["evals"][-1]["time_without_eval"]  # the first arm's (all-reduce's) training time
            for i, rate in enumerate(st["rates"]):
                todo = [arm for arm in (list(configs) if i % 2 == 0 else list(configs)[::-1])  # alternate:
                        if (profile, rate, arm) not in done]  # drifts hit both ends
                if not todo:
                    continue
                link.shape(rate)
                mbit = link.measure_throughput(nbytes=int(rate * 1e6 / 8 * 0.5))
                nominal = cm.Link(rate * 1e6)
                for arm in todo:
                    cfg = configs[arm]
                    rec = run_cell(link, cfg, out / profile / f"{rate}mbit" / arm, st)
                    pred = predict(arm, cfg, compute[arm], m, nominal)
                    rec.update({"profile": profile, "rate_mbit": rate, "measured_mbit": mbit, "arm": arm,
                                "calibration": False, "compute_s": compute[arm], "budget_s": budget,
                                "accuracy_at_budget": accuracy_at(rec["evals"], budget),
                                "predicted_s_per_step": pred,
                                "predicted_time_to_target": (pred * rec["step_at_target"]
                                                             if pred is not None and rec["step_at_target"] else None),
                                "predicted_link_bytes_per_step": predicted_link_bytes(arm, cfg, m),
                                "link_demand_mbit": 8 * cm.ring_allreduce_link_bytes(m["grad"], world)
                                / max(compute["allreduce"], 1e-9) / 1e6 if "allreduce" in compute else None})
                    record(rec)
                    print(f"{profile} {rate} Mbit/s {arm}: {rec['s_per_step']:.3f} s/step (predicted "
                          f"{fmt(pred, '.3f')}), target at {fmt(rec['time_to_target'], '.1f')} s", flush=True)
            for r in records:
                if r["profile"] == profile:
                    r.setdefault("model_bytes", m)
    result = _result(quick, st, retarget(records, st["target"]), arms)
    _plot(out.parent / "sweep_time_to_target.png", records)
    return result


def common_target(records: list[dict], profile: str, target: float) -> float:
    """`target`, or, if an arm's calibration run never reaches it, the highest validation accuracy
    that every arm's calibration run reaches (rounded down to 0.5 points): time to target needs a
    level all arms attain, and steps to a level do not depend on the link (training is identical)."""
    best = [max(e["accuracy"] for e in r["evals"]) for r in records
            if r["profile"] == profile and r["calibration"] and r["arm"] != "codistill_flat" and r["evals"]]
    return reachable_target(best, target)


def retarget(records: list[dict], target: float) -> list[dict]:
    """Each cell's step and time to its profile's common target (`common_target`), measured and predicted."""
    for profile in {r["profile"] for r in records}:
        t = common_target(records, profile, target)
        for r in records:
            if r["profile"] != profile:
                continue
            hit = first_reaching(r["evals"], t)
            r.update(target=t, time_to_target=hit and hit["time_without_eval"], step_at_target=hit and hit["step"])
            pred = r.get("predicted_s_per_step")
            r["predicted_time_to_target"] = pred * r["step_at_target"] if pred and r["step_at_target"] else None
    return records


def report(directory: Path) -> Result:
    """Redo the tables, notes and plot from a finished sweep's sweep.json (no training)."""
    data = json.loads((Path(directory) / "sweep.json").read_text())
    quick = "--quick" in data["command"]
    st = settings(quick)
    records = retarget(data["data"]["runs"], st["target"])
    result = _result(quick, st, records, tuple(data["data"]["arms"]))
    result.machine = data["machine"]
    _plot(Path(directory) / "sweep_time_to_target.png", records)
    return result


def relative_errors(records: list[dict], key: str) -> list[float]:
    return [abs(r[f"predicted_{key}"] - r[key]) / r[key] for r in records
            if not r["calibration"] and r.get(f"predicted_{key}") is not None and r.get(key)]


def _result(quick: bool, st: dict, records: list[dict], arms: tuple[str, ...]) -> Result:
    rows = []
    for r in records:
        rate = "unshaped (calibration)" if r["calibration"] else f"{r['rate_mbit']} Mbit/s"
        rows.append([r["profile"], f"{rate} ({r['measured_mbit']:.0f} measured)", r["arm"],
                     f"{r['n_models']} x {r['replicas']}", r["steps"], f"{r['s_per_step']:.3f}",
                     fmt(r.get("predicted_s_per_step"), ".3f"), fmt_bytes(r["link_bytes_per_step"]),
                     fmt_bytes(r.get("predicted_link_bytes_per_step")),
                     fmt(r["step_at_target"], "d", "-"), fmt(r["time_to_target"], ".1f", "not reached"),
                     fmt(r.get("predicted_time_to_target"), ".1f"),
                     fmt(r.get("accuracy_at_budget") and 100 * r["accuracy_at_budget"], ".2f")])
    table = markdown_table(
        ["profile", "link", "arm", "models x workers", "updates", "s/step", "predicted s/step",
         "link bytes/step (veth)", "predicted bytes/step", "step at target",
         "time to target (s)", "predicted time to target (s)", "val acc at budget (%)"], rows)
    step_err, ttt_err = relative_errors(records, "s_per_step"), relative_errors(records, "time_to_target")
    med_step = statistics.median(step_err) if step_err else None
    med_ttt = statistics.median(ttt_err) if ttt_err else None
    speedups = []
    for (profile, rate) in sorted({(r["profile"], r["rate_mbit"]) for r in records if not r["calibration"]},
                                  key=lambda k: (k[0], -k[1])):
        cell = {r["arm"]: r for r in records if r["profile"] == profile and r["rate_mbit"] == rate}
        ar = cell.get("allreduce")
        if not (ar and ar["time_to_target"]):
            continue
        faster = [f"{arm} {ar['time_to_target'] / r['time_to_target']:.2f}x" for arm, r in cell.items()
                  if arm != "allreduce" and r["time_to_target"]]
        if faster:
            speedups.append(f"{profile} at {rate} Mbit/s, speed to the target relative to all-reduce: "
                            f"{', '.join(faster)} (all-reduce link time / compute: "
                            f"{(ar['s_per_step'] - ar['compute_s']) / max(ar['compute_s'], 1e-9):.1f})")
    demand = {r["profile"]: r["link_demand_mbit"] for r in records if r.get("link_demand_mbit")}
    hierarchy = hierarchical_check(records)
    targets = {r["profile"]: r.get("target", st["target"]) for r in records}
    notes = [f"W = {2 * st['nproc_per_node']} workers on two emulated machines; arms {', '.join(arms)} "
             f"(codistillation asynchronous, D = {st['delay']}); "
             f"{'digits, cnn_tiny (quick)' if quick else 'Fashion-MNIST, batch 64 per worker'}; one run per cell. "
             "Times are the training clock without evaluations; link bytes are the veth counters (both directions, "
             "evaluation traffic and TCP/IP included); predicted bytes are the exchange or ring payload on the wire.",
             "Target (validation accuracy of model 0): " + ", ".join(
                 f"{p} {100 * t:.1f}%" for p, t in sorted(targets.items()))
             + f" ({100 * st['target']:.0f}%, or the highest level every arm's calibration run reaches).",
             "Cost model: compute per step from each arm's unshaped calibration cell, bytes from the model's tensors, "
             "the nominal tbf rate; nothing fitted per cell. Predicted time to target = predicted s/step x the "
             "measured step at the target (steps to a target do not depend on the link).",
             f"median absolute error of the cost model over {len(step_err)} measured cells: s/step "
             f"{fmt(med_step and 100 * med_step, '.1f')}%, time to target {fmt(med_ttt and 100 * med_ttt, '.1f')}% "
             f"(target <= {100 * TARGET_ERROR:.0f}%: "
             f"{'met' if med_step is not None and med_step <= TARGET_ERROR else 'missed'} for s/step).",
             "link demand (all-reduce gradient bytes per direction per second of compute, calibration cell): "
             + ", ".join(f"{p} {d:.0f} Mbit/s" for p, d in demand.items()) + ".",
             *speedups, *[h["note"] for h in hierarchy]]
    return Result(name="sweep", title="Where codistillation pays: time to accuracy across link rates",
                  command=f"codistill bench sweep{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"target": st["target"], "targets": targets, "runs": records, "median_error_s_per_step": med_step,
                        "median_error_time_to_target": med_ttt, "arms": list(arms), "hierarchical": hierarchy},
                  machine=machine_info())


def hierarchical_check(records: list[dict]) -> list[dict]:
    """Per profile, the unshaped codistillation cell with the hierarchical exchange against the same
    run with every replica's column crossing: link bytes saved (measured vs predicted) and whether
    training was identical (every model's validation loss equal)."""
    out = []
    for profile in sorted({r["profile"] for r in records}):
        cal = {r["arm"]: r for r in records if r["profile"] == profile and r["calibration"]}
        hier, flat = cal.get("codistill"), cal.get("codistill_flat")
        if not (hier and flat):
            continue
        saved = flat["link_bytes_per_step"] - hier["link_bytes_per_step"]
        predicted = flat["predicted_link_bytes_per_step"] - hier.get("predicted_link_bytes_per_step", 0.0)
        identical = hier["val_losses"] == flat["val_losses"]
        out.append({"profile": profile, "saved_bytes_per_step": saved, "predicted_saved_bytes_per_step": predicted,
                    "identical_training": identical,
                    "note": f"{profile}, hierarchical exchange ({flat['replicas']} replicas per machine): link bytes "
                            f"per step {fmt_bytes(hier['link_bytes_per_step'])} vs {fmt_bytes(flat['link_bytes_per_step'])} "
                            f"with every column crossing; saved {fmt_bytes(saved)} per step (predicted "
                            f"{fmt_bytes(predicted)}: the exchange divided by the replicas per machine); training "
                            f"{'identical (every validation loss equal)' if identical else 'NOT identical'}."})
    return out


def _plot(path: Path, records: list[dict]) -> None:
    """Time to target vs link rate, one panel per profile: measured (solid), cost model (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({r["profile"] for r in records})
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, profile in zip(axes[0], profiles):
        for arm in sorted({r["arm"] for r in records if r["profile"] == profile}):
            cells = sorted((r for r in records if r["profile"] == profile and r["arm"] == arm and not r["calibration"]),
                           key=lambda r: r["rate_mbit"])
            if not cells:  # calibration-only arms (the flat exchange check)
                continue
            rates = [r["rate_mbit"] for r in cells]
            line, = ax.plot(rates, [r["time_to_target"] or float("nan") for r in cells], "o-", label=f"{arm} measured")
            ax.plot(rates, [r["predicted_time_to_target"] or float("nan") for r in cells], "x--",
                    color=line.get_color(), label=f"{arm} cost model")
        ax.set_xscale("log")
        ax.set_yscale("log")  # all-reduce spans two orders of magnitude
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel("seconds to target accuracy")
        ax.set_title(profile)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # python -m codistill.bench.sweep --report DIR: re-analyse a finished sweep
    from .common import report_main

    report_main(report, "sweep.json")
