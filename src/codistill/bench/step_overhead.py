"""Step overhead: a codistillation worker's optimizer step against its floor, in one process.

    floor      = t(forward + backward + optimizer step of the worker's own model)
                 + (n - 1) * t(forward of one teacher, no autograd, eval mode)
    measured   = t(one codistillation step: student forward, the n - 1 teachers' logits
                 (`Teachers.logits`), `codistillation_loss`, backward, optimizer step)
    efficiency = floor / measured          (target >= 0.9)

Everything is the library's own code: `build_model`, `Teachers` (frozen copies bound to flat
buffers, exactly as the trainer holds them), `codistillation_loss`, `build_optimizer`. The floor's
own step is what an all-reduce worker does (`codistillation_loss` with no teachers). No
communication is involved: the exchange is measured by `bench bytes` and `bench stall`.

Timings are interleaved: each repeat times a block of iterations of every variant, in an order
that rotates between repeats, so slow drifts of a shared machine hit every variant alike. The
efficiency is computed within each repeat (side by side) and the median over repeats reported.
One intra-op thread, as each training worker uses on CPU (`dist.threads`).

A second table times the n - 1 teachers' forward three ways, for the choices the issue leaves
open: one after the other (what `Teachers.logits` does), batched into one vectorized call
(torch.func.vmap over their stacked weights), and under bf16 autocast.
"""

from __future__ import annotations

import time

import torch

from ..config import load_config
from ..exchange import Teachers
from ..losses import codistillation_loss
from ..models import build_model
from ..recipe import build_optimizer
from .common import Result, fmt, machine_info, markdown_table, median

INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST
NUM_CLASSES = 10


def _block(fn, iters: int) -> float:
    """Seconds per call of `fn`, over one block of `iters` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def measure_model(name: str, ns: list[int], batch: int, repeats: int, iters: int, warmup: int = 2,
                  variants: bool = True) -> dict:
    """Median seconds of every variant, and the per-repeat efficiencies, for one model."""
    torch.manual_seed(0)
    cfg = load_config(None, [])
    student = build_model(name, NUM_CLASSES, INPUT_SHAPE)
    optimizer = build_optimizer(student, cfg)
    for g in optimizer.param_groups:  # what the trainer's schedules set before each step
        g["lr"], g["weight_decay"] = 0.01, 5e-4 if g.get("decay", True) else 0.0
    teachers = {n: Teachers({j: build_model(name, NUM_CLASSES, INPUT_SHAPE) for j in range(1, n)}, "eval")
                for n in ns}
    one_teacher = next(iter(teachers[min(ns)].modules.values()))
    x = torch.randn(batch, *INPUT_SHAPE)
    y = torch.randint(NUM_CLASSES, (batch,))
    student.train()

    def own_step():
        out = codistillation_loss(student(x), [], y)
        optimizer.zero_grad(set_to_none=True)
        out["total"].backward()
        optimizer.step()

    def teacher_forward():
        with torch.no_grad():
            one_teacher(x)

    def codistill_step(t: Teachers):
        logits = student(x)
        out = codistillation_loss(logits, t.logits(x), y, alpha=1.0, kind="kl", temperature=1.0)
        optimizer.zero_grad(set_to_none=True)
        out["total"].backward()
        optimizer.step()

    fns = {"own": own_step, "teacher": teacher_forward}
    fns.update({f"codistill_n{n}": (lambda t=teachers[n]: codistill_step(t)) for n in ns})
    if variants:
        nmax = max(ns)
        fns.update(teacher_variants(teachers[nmax], x))
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
            "efficiency_per_repeat": eff, "params": sum(p.numel() for p in student.parameters())}


def teacher_variants(teachers: Teachers, x: torch.Tensor) -> dict:
    """The n - 1 teachers' forward: sequential (the library), vmap-batched, bf16 autocast."""
    mods = list(teachers.modules.values())

    def sequential():
        teachers.logits(x)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            teachers.logits(x)

    out = {"teachers_sequential": sequential, "teachers_bf16": bf16}
    try:
        from torch.func import functional_call, stack_module_state

        params, buffers = stack_module_state(mods)
        base = mods[0]

        def one(p, b, inp):
            return functional_call(base, (p, b), (inp,))

        batched = torch.vmap(one, in_dims=(0, 0, None))

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


def run(quick: bool = False) -> Result:
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
            rows.append([name, n, f"{1e3 * m['own']:.1f}", f"{1e3 * m['teacher']:.1f}", f"{1e3 * floor:.1f}",
                         f"{1e3 * m[f'codistill_n{n}']:.1f}", f"{e:.3f}", "yes" if e >= 0.9 else "no"])
        nmax = max(ns)
        seq = m.get("teachers_sequential")
        vm = m.get("teachers_vmap")
        bf = m.get("teachers_bf16")
        variant_rows.append([name, nmax - 1, fmt(seq and 1e3 * seq, ".1f"), fmt(vm and 1e3 * vm, ".1f", "n/a"),
                             fmt(vm and seq / vm, ".2f", "n/a"), fmt(bf and 1e3 * bf, ".1f"),
                             fmt(bf and seq / bf, ".2f")])
    table = markdown_table(
        ["model", "n", "own step (ms)", "teacher fwd (ms)", "floor (ms)", "codistill step (ms)",
         "efficiency", ">= 0.9"], rows)
    table += f"\n\nForward of the n - 1 teachers, batch {batch}:\n\n" + markdown_table(
        ["model", "teachers", "sequential (ms)", "vmap-batched (ms)", "speedup", "bf16 autocast (ms)", "speedup"],
        variant_rows)
    effs = [r["efficiency"][n] for r in results.values() for n in ns]
    notes = [f"batch {batch}, input 1x28x28, one intra-op thread; median over "
             f"{'3' if quick else '15 (cnn) / 9 (resnet20)'} interleaved repeats; efficiency = floor / measured, "
             "computed within each repeat.",
             f"target efficiency >= 0.9: {'met' if min(effs) >= 0.9 else 'missed'} "
             f"(lowest {min(effs):.3f})."]
    return Result(name="step_overhead", title="Step overhead: codistillation step vs its floor",
                  command=f"codistill bench step_overhead{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"batch": batch, "results": {k: {**v, "efficiency": {str(n): e for n, e in v["efficiency"].items()},
                                                          "efficiency_per_repeat": {str(n): e for n, e in
                                                                                    v["efficiency_per_repeat"].items()}}
                                                      for k, v in results.items()},
                        "met": min(effs) >= 0.9},
                  machine=machine_info())


__all__ = ["run", "measure_model"]
