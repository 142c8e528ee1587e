"""Step overhead: a codistillation worker's optimizer step against its floor, in one process.

    floor      = t(optimizer step of an all-reduce worker: forward + backward + step of its own model)
                 + (n - 1) * t(forward of one teacher, no autograd, eval mode)
    measured   = t(optimizer step of a codistillation worker with n - 1 teachers)
    efficiency = floor / measured          (target >= 0.9)

Both steps are the library's own `Trainer.train_step` (schedules, teachers' logits, the loss, backward,
optimizer step, the metric window), on one fixed Fashion-MNIST-shaped batch, in one process: a
single-process gloo group, so no DDP and no communication (the exchange is `bench bytes` and `bench
stall`). The codistillation worker is the trainer of one model group whose n - 1 teachers hold
weights (exchange through storage, so that one process can hold a model group of its own; T is set
beyond the timed steps, so only step 0, in the warm-up, exchanges). The teacher forward of the floor
is one of its `Teachers`' modules under no_grad.

Timings are interleaved: each repeat times a block of steps of every variant, in an order that
rotates between repeats, so slow drifts of a shared machine hit every variant alike. The efficiency
is computed within each repeat (side by side) and the median over repeats reported. One intra-op
thread, as each training worker uses on CPU (`dist.threads`).

A second table times the n - 1 teachers' forward three ways, for the choices the issue leaves
open: one after the other (what `Teachers.logits` does), batched into one vectorized call
(torch.func.vmap over their stacked weights), and under bf16 autocast (`codistill.teacher_precision`).
A third table (teacher_cost.py) gives the ratio that decides when codistillation pays: a
codistillation step (n = 2) over an all-reduce step's compute, per model (cnn, resnet20,
transformer_tiny, gpt_tiny; quick: cnn_tiny) and per cheaper-teacher setting (cheap_teachers.py).
The full mode also trains two short real runs, fp32 and bf16 teachers, to measure bf16's effect
on accuracy rather than assume it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..exchange import Teachers
from . import teacher_cost
from .teacher_cost import quartiles
from .common import Result, fmt, machine_info, markdown_table, median


def _block(fn, iters: int) -> float:
    """Seconds per call of `fn`, over one block of `iters` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _trainer(ctx, model: str, data: str, batch: int, n: int, exchange_dir: str, precision: str = "fp32"):
    """A real Trainer of one model group of one worker; its n - 1 teachers marked as holding weights
    (each trainer exchanges through a directory of its own)."""
    where = Path(exchange_dir) / f"{model}_n{n}_{precision}"
    return teacher_cost.build_trainer(ctx, model, n, where, precision=precision, data=data, batch=batch)


def measure_model(name: str, ns: list[int], batch: int, repeats: int, iters: int, warmup: int = 2,
                  data: str = "fashion_mnist") -> dict:
    """Median seconds of every variant, and the per-repeat efficiencies, for one model."""
    from ..distributed import init_distributed, shutdown

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="codistill_bench_") as tmp:
        ctx = init_distributed("gloo", threads=1, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            own = _trainer(ctx, name, data, batch, 1, tmp)
            workers = {n: _trainer(ctx, name, data, batch, n, tmp) for n in ns}
            bf16 = _trainer(ctx, name, data, batch, min(ns), tmp, precision="bf16")
            return _time_variants(own, workers, bf16, ns, repeats, iters, warmup)
        finally:
            shutdown()


def _time_variants(own, workers: dict, bf16, ns: list[int], repeats: int, iters: int, warmup: int) -> dict:
    batch_xy = next(iter(own.task.train_batches(own.topo, 0)[0]))
    x = own.task.inputs(batch_xy[0])
    one_teacher = next(iter(workers[min(ns)].teachers.modules.values()))

    def teacher_forward():
        with torch.no_grad():
            one_teacher(x)

    fns = {"own": lambda: own.train_step(batch_xy), "teacher": teacher_forward}
    fns.update({f"codistill_n{n}": (lambda t=workers[n]: t.train_step(batch_xy)) for n in ns})
    fns[f"codistill_n{min(ns)}_bf16_teachers"] = lambda: bf16.train_step(batch_xy)
    fns.update(teacher_variants(workers[max(ns)].teachers, x))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always runs first
        for k in order:
            times[k].append(_block(fns[k], iters))
    eff = {n: [(times["own"][r] + (n - 1) * times["teacher"][r]) / times[f"codistill_n{n}"][r]
               for r in range(repeats)] for n in ns}
    return {"median_s": {k: median(v) for k, v in times.items()}, "efficiency": {n: median(e) for n, e in eff.items()},
            "efficiency_per_repeat": eff, "params": sum(p.numel() for p in own.model.parameters()),
            "teacher_forwards_per_step": {n: teacher_forwards(workers[n], batch_xy) for n in ns}}


def teacher_forwards(trainer, batch_xy) -> int:
    """Teacher forwards in one step of `trainer`, counted with hooks: what the timed step really ran
    (a count, where a comparison of single-step times would be noise on a shared machine)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in trainer.teachers.modules.values()]
    try:
        trainer.train_step(batch_xy)
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def teacher_variants(teachers: Teachers, x: torch.Tensor) -> dict:
    """The n - 1 teachers' forward: sequential (the library), vmap-batched, bf16 autocast."""
    mods = list(teachers.modules.values())

    def sequential():
        teachers.logits(x)

    def bf16():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            teachers.logits(x)

    out = {"teachers_sequential": sequential, "teachers_bf16": bf16}
    try:
        from torch.func import functional_call, stack_module_state

        params, buffers = stack_module_state(mods)
        base = mods[0]
        batched = torch.vmap(lambda p, b, inp: functional_call(base, (p, b), (inp,)), in_dims=(0, 0, None))

        def vmapped():
            with torch.no_grad():
                batched(params, buffers, x)

        with torch.no_grad():  # vmap must work on this model, and agree with the sequential path
            ref = torch.stack(teachers.logits(x))
            got = batched(params, buffers, x)
        if torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
            out["teachers_vmap"] = vmapped
    except Exception:  # noqa: BLE001  (a model vmap cannot batch simply gets no vmap column)
        pass
    return out


def bf16_accuracy_effect(out: Path, steps: int = 400) -> dict:
    """Two real short runs (n = 2, one worker per model), fp32 vs bf16 teachers: final accuracies."""
    from .local import run_local

    base = ["data.name=fashion_mnist", "model.name=cnn", "data.batch_size=64", f"train.steps={steps}",
            "codistill.n_models=2", "codistill.exchange_every=50", "train.progress=false", "dist.threads=1",
            f"train.eval_every={steps}", "train.log_every=50"]
    runs = [(p, load_config(None, base + [f"codistill.teacher_precision={p}"])) for p in ("fp32", "bf16")]
    summaries = run_local(runs, 2, out / "teacher_precision_runs")
    return {p: {"val_accuracy": [m["val_accuracy"] for m in s["models"]],
                "test_accuracy": [m["test_accuracy"] for m in s["models"]],
                "ensemble_test_accuracy": s["ensemble_test_accuracy"], "wall_seconds": s["wall_seconds"],
                "steps": s["steps"]} for p, s in summaries.items()}


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    torch.set_num_threads(1)
    models = ["cnn_tiny"] if quick else ["cnn", "resnet20"]  # quick: checks the table, not the speed
    ns = [2, 4]
    batch = 16 if quick else 64
    results = {}
    for name in models:
        heavy = name.startswith("resnet")
        repeats = 3 if quick else (9 if heavy else 15)
        iters = 1 if quick else (2 if heavy else 5)
        results[name] = measure_model(name, ns, batch, repeats, iters, warmup=1 if quick else 2)

    rows, variant_rows = [], []
    for name, r in results.items():
        m = r["median_s"]
        for n in ns:
            floor = m["own"] + (n - 1) * m["teacher"]
            e = r["efficiency"][n]
            q1, q3 = quartiles(r["efficiency_per_repeat"][n])
            rows.append([name, n, f"{1e3 * m['own']:.1f}", f"{1e3 * m['teacher']:.1f}", f"{1e3 * floor:.1f}",
                         f"{1e3 * m[f'codistill_n{n}']:.1f}", f"{e:.3f}", f"{q1:.2f} - {q3:.2f}",
                         "yes" if e >= 0.9 else "no"])
        seq, vm, bf = m["teachers_sequential"], m.get("teachers_vmap"), m["teachers_bf16"]
        n2, n2bf = m[f"codistill_n{min(ns)}"], m[f"codistill_n{min(ns)}_bf16_teachers"]
        variant_rows.append([name, max(ns) - 1, f"{1e3 * seq:.1f}", fmt(vm and 1e3 * vm, ".1f", "n/a"),
                             fmt(vm and seq / vm, ".2f", "n/a"), f"{1e3 * bf:.1f}", f"{seq / bf:.2f}",
                             f"{1e3 * n2:.1f} / {1e3 * n2bf:.1f}"])
    table = markdown_table(
        ["model", "n", "own step (ms)", "teacher fwd (ms)", "floor (ms)", "codistill step (ms)",
         "efficiency", "quartiles over repeats", ">= 0.9"], rows)
    table += f"\n\nForward of the n - 1 teachers, batch {batch}:\n\n" + markdown_table(
        ["model", "teachers", "sequential (ms)", "vmap-batched (ms)", "speedup", "bf16 autocast (ms)", "speedup",
         f"n={min(ns)} step, fp32 / bf16 teachers (ms)"], variant_rows)
    effs = [r["efficiency"][n] for r in results.values() for n in ns]
    notes = [f"batch {batch}, input 1x28x28, one intra-op thread; `Trainer.train_step` timed, median over "
             f"{'3' if quick else '15 (cnn) / 9 (resnet20)'} interleaved repeats; efficiency = floor / measured, "
             "computed within each repeat.",
             f"target efficiency >= 0.9: {'met' if min(effs) >= 0.9 else 'missed'} (lowest {min(effs):.3f})."]
    data = {"batch": batch, "met": min(effs) >= 0.9,
            "results": {k: {**v, "efficiency": {str(n): e for n, e in v["efficiency"].items()},
                            "efficiency_per_repeat": {str(n): e for n, e in v["efficiency_per_repeat"].items()}}
                        for k, v in results.items()}}
    cost = teacher_cost.run_all(["cnn_tiny"] if quick else teacher_cost.FULL_MODELS, 3 if quick else 5)
    data["teacher_cost"] = cost
    cost_table, cost_notes = teacher_cost.table(cost)
    table += "\n\nTeacher cost per setting: codistillation step / all-reduce step's compute:\n\n" + cost_table
    notes += cost_notes
    if not quick:
        effect = bf16_accuracy_effect(Path(out))
        data["bf16_teachers"] = effect
        table += "\n\nbf16 teachers, accuracy effect (Fashion-MNIST, cnn, n = 2, one worker per model, " \
                 f"{effect['fp32']['steps']} steps, T = 50, one run each):\n\n" + markdown_table(
                     ["teachers", "val acc model 0 / 1 (%)", "test acc model 0 / 1 (%)", "ensemble test acc (%)",
                      "training (s)"],
                     [[p, " / ".join(f"{100 * a:.2f}" for a in e["val_accuracy"]),
                       " / ".join(f"{100 * a:.2f}" for a in e["test_accuracy"]),
                       f"{100 * e['ensemble_test_accuracy']:.2f}", f"{e['wall_seconds']:.0f}"]
                      for p, e in effect.items()])
    return Result(name="step_overhead", title="Step overhead: codistillation step vs its floor",
                  command=f"codistill bench step_overhead{' --quick' if quick else ''}", table=table, notes=notes,
                  data=data, machine=machine_info())
