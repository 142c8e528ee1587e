"""Our DiLoCo (`codistill.outer_sync.OuterSync`) against torchft's own (`torchft.local_sgd.DiLoCo`).

Two model groups of one worker each (k = 1), gloo on CPU, the same model, initialization, data
order, inner optimizer and outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9, H inner steps):
the only difference between the two arms is who performs the outer step. torchft's arm starts a
`LighthouseServer` here and one `Manager` per group, as its authors' tests do
(torchft/local_sgd_integ_test.py, torchft/_test/diloco_trainer.py).

The model is the MLP (no BatchNorm): torchft averages parameters only, while ours also averages
floating-point buffers, a documented difference that does not arise without buffers. Both arms
start from the same seed, so torchft's `init_sync` (healing from the primary at step 0) is turned
off, and ours' step-0 broadcast of model 0's initialization is a no-op.
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import Result, machine_info, markdown_table

OUTER = dict(lr=0.7, momentum=0.9, nesterov=True)


def _setup(seed: int, group: int, quick: bool):
    """Data, model and inner optimizer of one group: identical in both arms."""
    from ..data import load_dataset
    from ..models import build_model

    torch.set_num_threads(1)
    data = load_dataset("digits")
    x, y = data.train.inputs, data.train.targets
    split = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = split[:297], split[297:]
    torch.manual_seed(seed)  # every group starts from the same initialization (DiLoCo's shared start)
    model = build_model("mlp", 10, (1, 8, 8), hidden=64)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(1000 * seed + group)  # each group its own data order

    def batches():
        while True:
            for idx in train[torch.randperm(len(train), generator=order)].split(32):
                yield x[idx], y[idx]

    def accuracy() -> float:
        with torch.no_grad():
            return (model(x[test]).argmax(1) == y[test]).float().mean().item()

    return model, inner, batches(), accuracy


def _train(model, inner, batches, accuracy, steps: int, every: int, after_step) -> dict:
    """Inner steps; `after_step(s)` runs the implementation's sync; accuracy at every outer step."""
    curve, losses = [], []
    for s in range(1, steps + 1):
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        inner.zero_grad()
        loss.backward()
        inner.step()
        after_step(s)
        losses.append(loss.item())
        if s % every == 0:
            curve.append((s, accuracy(), statistics.fmean(losses[-every:])))
    return {"curve": curve, "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


def _ours_worker(rank: int, world: int, store, seed: int, steps: int, every: int, out: str,
                 quick: bool) -> None:
    import torch.distributed as dist

    from ..outer_sync import OuterSync
    from ..topology import build_topology

    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model, inner, batches, accuracy = _setup(seed, rank, quick)
        sync = OuterSync(model, build_topology(world), every, **OUTER)
        sync.maybe_exchange(0)

        def after_step(s):  # ours syncs at the start of step s = H, 2H, ...; finish() at the end
            if s == steps:
                sync.finish()
            elif s % every == 0:
                sync.maybe_exchange(s)

        result = _train(model, inner, batches, accuracy, steps, every, after_step)
        torch.save(result, Path(out) / f"ours_seed{seed}_group{rank}.pt")
    finally:
        dist.destroy_process_group()


def _torchft_worker(rank: int, world: int, _store, seed: int, steps: int, every: int, out: str,
                    lighthouse: str) -> None:
    import torch.distributed as dist
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    model, inner, batches, accuracy = _setup(seed, rank, False)
    outer = torch.optim.SGD(model.parameters(), **OUTER)
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)  # this group's store
    timeout = timedelta(seconds=120)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout), min_replica_size=world, use_async_quorum=False,
        load_state_dict=lambda state: (model.load_state_dict(state["model"]), inner.load_state_dict(state["inner"])),
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        replica_id=f"group{rank}", store_addr="localhost", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=lighthouse, init_sync=False, timeout=timeout, quorum_timeout=timeout,
        connect_timeout=timeout)
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=every, backup_device=torch.device("cpu"),
                    pin_memory=False):
            result = _train(model, inner, batches, accuracy, steps, every, lambda s: None)  # syncs in its hook
        result["commits"] = manager.current_step()
        torch.save(result, Path(out) / f"torchft_seed{seed}_group{rank}.pt")
    finally:
        manager.shutdown(wait=False)


def run(quick: bool, out: Path) -> Result:
    from ..distributed import spawn

    seeds, steps, every = ((0,), 40, 10) if quick else ((0, 1, 2), 300, 10)
    out = Path(out) / "torchft_diloco"
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    runs: dict[str, dict[int, dict]] = {"ours": {}, "torchft": {}}
    wall = {"ours": 0.0, "torchft": 0.0}
    error = None
    for seed in seeds:
        t0 = time.perf_counter()
        spawn(_ours_worker, 2, out, args=(seed, steps, every, str(out), quick))
        wall["ours"] += time.perf_counter() - t0
        runs["ours"][seed] = torch.load(out / f"ours_seed{seed}_group0.pt", weights_only=True)
        try:
            from torchft._torchft import LighthouseServer

            lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
            t0 = time.perf_counter()
            try:
                spawn(_torchft_worker, 2, out, args=(seed, steps, every, str(out), lighthouse.address()))
            finally:
                lighthouse.shutdown()
            wall["torchft"] += time.perf_counter() - t0
            runs["torchft"][seed] = torch.load(out / f"torchft_seed{seed}_group0.pt", weights_only=True)
        except Exception as e:  # noqa: BLE001 - recorded in the report, with its exact text
            error = f"{type(e).__name__}: {e}"
            break
    return _result(runs, wall, seeds, steps, every, error, machine, quick, out)


def _result(runs, wall, seeds, steps, every, error, machine, quick, out) -> Result:
    rows, finals = [], {}
    for impl in ("ours", "torchft"):
        accs = [100 * runs[impl][s]["curve"][-1][1] for s in seeds if s in runs[impl]]
        finals[impl] = accs
        if accs:
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            rows.append([impl, " / ".join(f"{a:.2f}" for a in accs), f"{statistics.fmean(accs):.2f}{spread}",
                         f"{wall[impl]:.0f}"])
    diffs = [(runs["ours"][s]["params"] - runs["torchft"][s]["params"]).abs().max().item()
             for s in seeds if s in runs["torchft"]]
    table = markdown_table(["implementation", "final test acc per seed (%)", "mean ± std (%)", "wall (s)"], rows)
    notes = [f"digits (1,500 train / 297 test images), MLP (hidden 64), 2 groups x 1 worker, {steps} inner "
             f"steps of SGD (lr 0.05, momentum 0.9, batch 32), outer Nesterov SGD (lr 0.7, momentum 0.9) every "
             f"H = {every} steps; seeds {list(seeds)}."]
    if diffs:
        notes.append("Largest |ours - torchft| over the final parameters of group 0, per seed: "
                     + ", ".join(f"{d:.2e}" for d in diffs) + ".")
    if error:
        notes.append(f"torchft could not run here: `{error}`")
    data = {"runs": {impl: {str(s): {"curve": r["curve"]} for s, r in rs.items()} for impl, rs in runs.items()},
            "final_accuracy": finals, "max_param_diff": diffs, "error": error, "seeds": list(seeds),
            "steps": steps, "every": every}
    plot = _plot(runs, out)
    if plot:
        notes.append(f"Curves: {plot.relative_to(out.parent)}")
    return Result("torchft_diloco", "DiLoCo: ours vs torchft's", "codistill bench torchft_diloco"
                  + (" --quick" if quick else ""), table, notes, data, machine)


def _plot(runs, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, style in (("ours", dict(color="C0", lw=3, alpha=0.5)), ("torchft", dict(color="C1", ls="--", lw=1.2))):
        for i, (seed, r) in enumerate(sorted(runs[impl].items())):
            steps, accs = [c[0] for c in r["curve"]], [100 * c[1] for c in r["curve"]]
            ax.plot(steps, accs, label=impl if i == 0 else None, **style)
    ax.set_xlabel("inner step")
    ax.set_ylabel("test accuracy of group 0 after each outer step (%)")
    ax.set_title("DiLoCo on digits: ours vs torchft (one line per seed)")
    ax.legend()
    fig.tight_layout()
    path = out / "torchft_diloco.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
