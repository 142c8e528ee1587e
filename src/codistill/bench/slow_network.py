"""Time to accuracy on a slow network: two emulated machines joined by a shaped link.

Two network namespaces (`netns.TwoMachines`) play two machines with 2 workers each; their link is
shaped with tc tbf (100 Mbit/s, 1 Gbit/s); each machine's loopback stays fast. `torchrun` runs
`codistill train` on both (static rendezvous on 10.77.0.1, inside the namespaces). Matched arms
(`arms.arm_configs`: same W = 4 workers, same updates, schedules rescaled as the paper does):

- all-reduce: one model on all 4 workers: every step's gradient all-reduce crosses the link;
- codistillation: 2 models; rank = model * replicas + replica puts model 0 on machine 0 and model 1
  on machine 1, so gradients stay on each machine and only the exchange (every T steps) and the
  evaluation's gathered predictions cross the link.

Measured per arm: the training time (metrics.jsonl's clock, started after a barrier, without the
time spent evaluating; also reported with it) until model 0 first reaches the target validation
accuracy, seconds per step, final accuracy at the matched number of updates, and the bytes the
link really carried (veth counters, both directions, TCP/IP included).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arms import arm_configs
from ..config import dump_yaml, load_config
from ..curves import first_reaching, training_clock
from ..run_log import atomic_write_text
from .common import Result, fmt, fmt_bytes, machine_info, markdown_table
from .netns import TwoMachines, torchrun_train

ARMS = ("allreduce", "codistill")


def settings(quick: bool) -> dict:
    if quick:  # checks the machinery and the table in about a minute, not the speed
        return {"rates": [1000], "nproc_per_node": 1, "target": 0.5, "timeout_s": 300,
                "overrides": ["data.name=digits", "model.name=cnn_tiny", "data.batch_size=16", "train.epochs=0.4",
                              "optim.lr=0.1", "schedule.scale_lr=false",
                              "codistill.exchange_every=5", "train.eval_every=5", "train.log_every=5",
                              "schedule.warmup_epochs=0", "schedule.milestones=[]"]}
    return {"rates": [100, 1000], "nproc_per_node": 2, "target": 0.84, "timeout_s": 1200,
            "overrides": ["data.name=fashion_mnist", "model.name=cnn", "data.batch_size=64", "train.epochs=1",
                          "codistill.exchange_every=50", "train.eval_every=30", "train.log_every=10",
                          "schedule.warmup_epochs=0.1", "schedule.milestones=[0.6, 0.85]"]}


def matched_configs(overrides: list[str], world: int) -> dict:
    cfg = load_config(None, ["train.progress=false", "dist.threads=1", "compare.arms=[allreduce, codistill]",
                             *overrides])
    return dict(arm_configs(cfg, world))


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    st = settings(quick)
    world = 2 * st["nproc_per_node"]
    configs = matched_configs(st["overrides"], world)
    out = Path(out) / "slow_network"
    for arm, cfg in configs.items():
        atomic_write_text(out / "configs" / f"{arm}.yaml", dump_yaml(cfg))
    records = []
    with TwoMachines(st["rates"][0]) as link:
        for i, rate in enumerate(st["rates"]):
            link.shape(rate)
            mbit = link.measure_throughput(nbytes=int(rate * 1e6 / 8 * 0.5))  # about half a second of traffic
            print(f"link shaped to {rate} Mbit/s (tbf): one TCP stream measures {mbit:.0f} Mbit/s", flush=True)
            arms = ARMS if i % 2 == 0 else ARMS[::-1]  # alternate the order: drifts hit both arms
            for arm in arms:
                run_dir = out / f"{rate}mbit" / arm
                before = link.link_bytes()
                launch_s = torchrun_train(link, ["--config", str(out / "configs" / f"{arm}.yaml"), "--out",
                                                 str(run_dir), "--overwrite"], out / f"{rate}mbit" / f"{arm}_logs",
                                          st["timeout_s"], nproc_per_node=st["nproc_per_node"])
                after = link.link_bytes()
                s = json.loads((run_dir / "summary.json").read_text())
                evals = training_clock(run_dir)
                hit = first_reaching(evals, st["target"])
                link_bytes = (after["tx"] - before["tx"]) + (after["rx"] - before["rx"])
                rec = {"rate_mbit": rate, "measured_mbit": mbit, "arm": arm, "n_models": s["n_models"],
                       "replicas": s["replicas"], "steps": s["steps"], "train_seconds": s["wall_seconds"],
                       "launch_seconds": launch_s, "s_per_step": evals[-1]["time_without_eval"] / evals[-1]["step"],
                       "time_to_target": hit and hit["time_without_eval"],
                       "time_to_target_with_eval": hit and hit["time"], "step_at_target": hit and hit["step"],
                       "evals": evals,
                       "val_accuracy": s["models"][0]["val_accuracy"], "test_accuracy": s["models"][0]["test_accuracy"],
                       "ensemble_test_accuracy": s["ensemble_test_accuracy"] if s["n_models"] > 1 else None,
                       "link_bytes": link_bytes, "link_bytes_per_step": link_bytes / s["steps"],
                       "counted_bytes_per_worker": s["bytes_per_worker"],
                       "exchange_blocked_fraction": s["exchange_blocked_fraction"]}
                records.append(rec)
                print(f"{rate} Mbit/s {arm}: {rec['s_per_step']:.3f} s/step, target at "
                      f"{fmt(rec['time_to_target'], '.1f')} s, "
                      f"test accuracy {100 * rec['test_accuracy']:.2f}%", flush=True)
    return _result(quick, st, records)


def _result(quick: bool, st: dict, records: list[dict]) -> Result:
    target = st["target"]
    rows, verdicts, data = [], [], {"target": target, "runs": records, "met": {}}
    for rate in st["rates"]:
        by_arm = {r["arm"]: r for r in records if r["rate_mbit"] == rate}
        ar, cd = by_arm["allreduce"], by_arm["codistill"]
        speedup = (ar["time_to_target"] / cd["time_to_target"]
                   if ar["time_to_target"] is not None and cd["time_to_target"] is not None else None)
        gap = 100 * (cd["test_accuracy"] - ar["test_accuracy"])
        for r in (ar, cd):
            rows.append([f"{rate} Mbit/s ({r['measured_mbit']:.0f} measured)", r["arm"],
                         f"{r['n_models']} x {r['replicas']}", r["steps"], f"{r['s_per_step']:.3f}",
                         fmt_bytes(r["link_bytes_per_step"]),
                         fmt(r["step_at_target"], "d", "-"), fmt(r["time_to_target"], ".1f", "not reached"),
                         fmt(r["time_to_target_with_eval"], ".1f", "-"),
                         fmt(speedup, ".2f") if r["arm"] == "codistill" else "1",
                         f"{100 * r['val_accuracy']:.2f}", f"{100 * r['test_accuracy']:.2f}"])
        data["met"][rate] = {"speedup": speedup, "test_accuracy_gap_points": gap}
        if speedup is None:
            reach = f"{100 * target:.0f}% validation accuracy was not reached by both arms"
        else:
            reach = (f"codistillation reaches {100 * target:.0f}% validation accuracy {speedup:.2f}x as fast as "
                     "all-reduce" + (f" (target >= 2x: {'met' if speedup >= 2 else 'missed'})" if rate == 100 else ""))
        verdicts.append(f"{rate} Mbit/s: {reach}"
                        + f"; final test accuracy {gap:+.2f} points vs all-reduce at {ar['steps']} updates each "
                        f"(target within 0.5: {'met' if abs(gap) <= 0.5 else 'missed'}).")
    table = markdown_table(
        ["link", "arm", "models x workers", "updates", "s/step", "link bytes/step (veth)",
         f"step at {100 * target:.0f}% val", "time to target (s)", "same, evaluations included (s)",
         "speedup to target", "val acc model 0 (%)", "test acc model 0 (%)"], rows)
    notes = [f"W = {2 * st['nproc_per_node']} workers on two emulated machines ({st['nproc_per_node']} each), "
             f"{'digits, cnn_tiny (quick)' if quick else 'Fashion-MNIST, cnn, batch 64 per worker'}; "
             "one run per cell. Times are the training clock (from a start barrier) without the time spent "
             "evaluating, which the next column includes; s/step likewise; link bytes are the veth counters "
             "(both directions, TCP/IP included).",
             *verdicts]
    return Result(name="slow_network", title="Time to accuracy on an emulated slow network",
                  command=f"codistill bench slow_network{' --quick' if quick else ''}", table=table, notes=notes,
                  data=data, machine=machine_info())
