"""ResNet-50 on GPU: images/s of an all-reduce worker vs a codistillation worker, and step efficiency.

The prepared script for the ResNet-50 row of docs/performance.md, on CUDA with NCCL, channels_last
and bf16 autocast (AMP; the teachers too unless --teacher-precision fp32), on synthetic
ImageNet-shaped data (224x224, 1000 classes: the input pipeline is not what is measured):

    python -m codistill.bench.gpu_resnet50 --doc docs/performance.md          # one GPU
    torchrun --nproc-per-node 8 -m codistill.bench.gpu_resnet50 --doc docs/performance.md

With W GPUs: the all-reduce worker is DDP over all W; the codistillation worker is DDP over its
model group of W / n and runs the n - 1 teachers (`Teachers`: frozen, no autograd, eval mode) on
its batch. With one GPU both groups have one worker, so the comparison is compute only. Timed
variants, interleaved over repeats (medians):

    allreduce         fwd + bwd + step, DDP over all W workers            -> images/s per worker
    own               fwd + bwd + step, DDP over the model group          (floor, part 1)
    teacher           one teacher's forward                               (floor, part 2)
    codistill         own + teachers' logits + the loss, through `Codistillation` (teachers on the same stream)
    codistill_stream  the same with the teachers on their own CUDA stream (overlapping the student)

    efficiency = (own + (n - 1) * teacher) / codistill                    (target >= 0.9)

Without a GPU it prints why nothing was measured and exits with status 2; `--allow-cpu` runs the
same code on CPU with gloo, in fp32, as a dry run of the script's logic (not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

NO_GPU = ("gpu_resnet50: no CUDA device is visible. This benchmark measures ResNet-50 on a GPU (NCCL, "
          "channels_last, bf16 autocast); nothing was measured, and the ResNet-50 row of docs/performance.md "
          "stays 'to be measured'. Run it on a machine with a GPU (--allow-cpu: a dry run of the logic only).")
BEGIN, END = "<!-- gpu-resnet50:begin -->", "<!-- gpu-resnet50:end -->"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m codistill.bench.gpu_resnet50", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=128, help="images per GPU")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--n-models", type=int, default=2, help="n: codistilled models (teachers = n - 1)")
    p.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="bf16",
                   help="teachers under bf16 autocast or not (codistill.teacher_precision)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=10, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="runs/bench-gpu-resnet50", help="directory for gpu_resnet50.md/.json")
    p.add_argument("--doc", help="replace the ResNet-50 section of this markdown file (between its markers)")
    p.add_argument("--allow-cpu", action="store_true", help="dry run on CPU with gloo (not a measurement)")
    return p.parse_args(argv)


def init(cpu: bool):
    """(rank, world, device): torchrun's environment, or one process on its own."""
    import torch
    import torch.distributed as dist

    backend = "gloo" if cpu else "nccl"
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local = int(os.environ.get("LOCAL_RANK", 0)) if under_torchrun else 0
    if cpu:
        device = torch.device("cpu")
    else:  # the device first, so that NCCL binds this process to it
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if under_torchrun:
        dist.init_process_group(backend)
    else:
        rendezvous = Path(tempfile.mkdtemp(prefix="gpu_resnet50_")) / "rendezvous"
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def codistillation(make, n: int, world: int, device, teacher_precision: str, exchange_dir: str):
    """The library's component for n models; this rank trains one of them with n - 1 teachers.

    W divisible by n: the grid (DDP over each model group of W / n). Otherwise (one GPU) one model
    per job, as with exchange through storage, DDP over all W. T is beyond the timed steps: only
    step 0 exchanges, and every teacher is then marked as holding weights.
    """
    from ..codistillation import Codistillation

    grid = n == 1 or (world >= n and world % n == 0)
    codist = Codistillation(make, n_models=n, every=10**9, alpha=1.0, device=device,
                            teacher_precision=teacher_precision, exchange="collective" if grid else "storage",
                            model_index=None if grid else 0, exchange_dir=exchange_dir)
    codist.maybe_exchange()
    codist.teachers.mark_received(0)
    return codist


def measure(args, rank: int, world: int, device) -> dict:
    import torch
    import torch.distributed as dist

    from ..config import load_config
    from ..models import build_model
    from ..recipe import build_optimizer

    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    teacher_amp = amp if args.teacher_precision == "bf16" else contextlib.nullcontext
    shape = (3, args.image_size, args.image_size)
    cfg = load_config(None, [])
    n = args.n_models

    def student():
        return build_model(args.model, args.classes, shape).to(device).to(memory_format=fmt)

    exchange_dir = tempfile.mkdtemp(prefix="gpu_resnet50_exchange_")
    allreduce = codistillation(student, 1, world, device, args.teacher_precision, exchange_dir)  # DDP over all W
    codist = codistillation(student, n, world, device, args.teacher_precision, exchange_dir)
    replicas = codist.topo.replicas
    opt_ar, opt_own = build_optimizer(allreduce.module, cfg), build_optimizer(codist.module, cfg)
    for opt in (opt_ar, opt_own):
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 1e-3, 1e-4
    one_teacher = next(iter(codist.teachers.modules.values()))
    x = torch.randn(args.batch, *shape, device=device).to(memory_format=fmt)
    y = torch.randint(args.classes, (args.batch,), device=device)
    side = codist.teacher_stream  # the teachers' own CUDA stream (None on CPU)

    def step(c, opt, teachers: bool = False, stream: bool = False):
        """One training step through the component: its teachers' logits, loss, backward, step."""
        c.teacher_stream = side if stream else None  # same stream, or overlapping the student
        t = c.teacher_logits(x) if teachers else []
        with amp():
            logits = c.model(x)
        out = c.loss(logits, y, t)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()

    def teacher_forward():
        with torch.no_grad(), teacher_amp():
            one_teacher(x)

    fns = {"allreduce": lambda: step(allreduce, opt_ar), "own": lambda: step(codist, opt_own),
           "teacher": teacher_forward, "codistill": lambda: step(codist, opt_own, teachers=True)}
    if cuda:
        fns["codistill_stream"] = lambda: step(codist, opt_own, teachers=True, stream=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()  # every rank times the same variant together (DDP variants communicate)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fns[k]()
            sync()
            times[k].append((time.perf_counter() - t0) / args.iters)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    eff = sorted((times["own"][r] + (n - 1) * times["teacher"][r]) / times["codistill"][r]
                 for r in range(args.repeats))[args.repeats // 2]
    best = min(med["codistill"], med.get("codistill_stream", float("inf")))
    return {"world": world, "n_models": n, "replicas": replicas, "batch": args.batch, "model": args.model,
            "teacher_precision": args.teacher_precision,
            "median_s": med, "efficiency": eff,
            "efficiency_stream": (med["own"] + (n - 1) * med["teacher"]) / best,
            "images_per_s": {k: args.batch / v for k, v in med.items() if k != "teacher"},
            "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)", "torch": torch.__version__}


def markdown(r: dict) -> str:
    ips = r["images_per_s"]
    head = ("| model | device | W | n x workers | batch/GPU | all-reduce img/s/worker | codistill img/s/worker "
            "(same stream / own stream) | own step (ms) | teacher fwd (ms) | codistill step (ms) | efficiency |")
    m = r["median_s"]
    stream = f"{ips['codistill_stream']:.0f}" if "codistill_stream" in ips else "-"
    row = (f"| {r['model']} | {r['device']} | {r['world']} | {r['n_models']} x {r['replicas']} | {r['batch']} | "
           f"{ips['allreduce']:.0f} | {ips['codistill']:.0f} / {stream} | {1e3 * m['own']:.1f} | "
           f"{1e3 * m['teacher']:.1f} | {1e3 * m['codistill']:.1f} | {r['efficiency']:.3f} |")
    how = ("CPU dry run: fp32, gloo, NOT a measurement" if r["device"] == "cpu (dry run)"
           else f"channels_last, bf16 autocast (student), {r['teacher_precision']} teachers, NCCL")
    return "\n".join([head, "|" + "---|" * 11, row]) + (
        f"\n\ntorch {r['torch']}, {how}; efficiency = (own + (n-1) teacher) / "
        f"codistill step, median over interleaved repeats; with the teachers on their own stream: "
        f"{r['efficiency_stream']:.3f}.\n")


def update_doc(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"gpu_resnet50: {path} has no {BEGIN} ... {END} section to replace")
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}{END}", doc, flags=re.S)
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(NO_GPU, file=sys.stderr)
        return 2
    import torch.distributed as dist

    rank, world, device = init(cpu=not torch.cuda.is_available())
    try:
        result = measure(args, rank, world, device)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        text = markdown(result)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_resnet50.md").write_text(text)
        (out / "gpu_resnet50.json").write_text(json.dumps(result, indent=2) + "\n")
        print(text)
        if args.doc and device.type == "cuda":  # a dry run never writes into the doc
            update_doc(Path(args.doc), text)
            print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
