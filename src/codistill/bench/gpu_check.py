"""One-shot GPU validation: every CUDA/NCCL path of codistill, end to end, one line per check.

    python -m codistill.bench.gpu_check --doc docs/performance.md     # a machine with 1 to 8 GPUs
    codistill bench gpu                                                # the same, results in runs/
    python -m codistill.bench.gpu_check --cpu                          # the same logic on CPU (gloo)

Each check runs the real command line (`codistill train`) on scikit-learn's bundled digits, so the
script needs no data set, and prints `ok`, `FAILED` (with the reason) or `skipped` (with why, e.g.
one GPU cannot hold two NCCL ranks). Checks: all-reduce with NCCL, bf16 autocast and channels_last;
codistillation with synchronous and asynchronous exchange; storage exchange with 2 replicas per job;
checkpoint + kill + resume, bitwise equal to an uninterrupted run under `train.deterministic`; the
exchange stall timing (nonzero on exchange steps); no host synchronization in the training step
(`torch.cuda.set_sync_debug_mode`, via CODISTILL_SYNC_DEBUG; with gradient accumulation and
clipping); fp16 with the gradient scaler; the sharded path (FSDP vs its DDP twin and export; teachers
offloaded to the CPU, bitwise equal; DiLoCo's outer state on the CPU; HSDP 2 x 2 vs DDP; a 2 x 2 run
killed and resumed at 2 x 1 through `--resume --nproc`); the ResNet-50 throughput table. Meant
to finish in under 8 minutes; with --doc its table replaces the section between the markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
DIGITS = ["data.name=digits", "model.name=cnn_tiny", "data.batch_size=16", "train.progress=false",
          "schedule.warmup_epochs=0", "codistill.exchange_every=5", "train.log_every=5", "train.eval_every=10"]


class Skip(Exception):
    """A check that cannot run on this machine (said, never counted as passed)."""


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def codistill(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "codistill.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc


def train(out: Path, world: int, sets: list[str], backend: str, extra: list[str] = (), env: dict | None = None,
          expect_ok: bool = True) -> dict:
    args = ["train", "--nproc", str(world), "--out", str(out), "--overwrite", *extra]
    for s in [*DIGITS, f"dist.backend={backend}", *sets]:
        args += ["--set", s]
    proc = codistill(args, env=env)
    if expect_ok and proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit {proc.returncode}")
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def final_state(run: Path) -> dict:
    from ..checkpoint import latest_model_states

    return {name: state["model"] for name, state in latest_model_states(run).items()}


def same_states(a: dict, b: dict) -> bool:
    import torch

    return bool(a) and a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def checks(cpu: bool, work: Path):
    """(name, function) pairs; each function returns a detail string or raises Skip / an error."""
    g = 0 if cpu else gpus()
    backend = "gloo" if cpu else "nccl"
    world = 2 if cpu else g  # one NCCL rank per GPU
    fast = ["train.amp=true", "model.channels_last=true"] if not cpu else []

    def need(workers: int, what: str):
        if world < workers:
            raise Skip(f"{what} needs {workers} workers and NCCL needs one GPU each; this machine has {g}")

    def allreduce():
        s = train(work / "allreduce", world, ["codistill.n_models=1", "train.steps=20", *fast], backend)
        return f"{world} worker(s), bf16 + channels_last: {not cpu}, val acc {s['models'][0]['val_accuracy']:.2f}"

    def codistill_sync():
        need(2, "codistillation in one job")
        s = train(work / "sync", world, ["codistill.n_models=2", "train.steps=20", *fast], backend)
        blocked = s["exchange_blocked_fraction"]
        if not blocked > 0:
            raise RuntimeError(f"exchange stall reads {blocked}: the timing misses the transfer")
        return f"{s['exchanges']} exchanges, stall fraction {blocked:.3f} (nonzero: timed)"

    def codistill_async():
        need(2, "codistillation in one job")
        s = train(work / "async", world, ["codistill.n_models=2", "codistill.exchange_delay=3",
                                          "train.steps=20", *fast], backend)
        return f"teacher steps {s['teacher_steps']}, final staleness {s['final_staleness']}"

    def storage():
        replicas = 2 if world >= 2 else 1
        exchange = work / "exchange_dir"
        for job in (0, 1):  # jobs never wait for each other: run one after the other on the same GPUs
            s = train(work / f"storage_{job}", replicas, ["codistill.n_models=2", "codistill.exchange=storage",
                      f"codistill.exchange_dir={exchange}", f"codistill.model_index={job}", "train.steps=20",
                      *fast], backend)
        if replicas < 2:
            raise Skip("ran with 1 replica per job; 2 replicas need 2 GPUs")
        return f"2 jobs x {replicas} replicas, teachers of job 1 from steps {s['teacher_steps']}"

    def resume():
        need(2, "codistillation with resume")
        sets = ["codistill.n_models=2", "train.steps=20", "train.checkpoint_every=5", "train.deterministic=true",
                *fast]
        train(work / "straight", world, sets, backend)
        train(work / "killed", world, sets, backend, env={"CODISTILL_FAULT": "kill@1:12"}, expect_ok=False)
        proc = codistill(["train", "--resume", str(work / "killed")])
        if proc.returncode != 0:
            raise RuntimeError(f"resume failed: {proc.stderr.strip().splitlines()[-1:]}")
        straight, killed = final_state(work / "straight"), final_state(work / "killed")
        if not same_states(straight, killed):
            raise RuntimeError("the resumed run's final weights differ from the uninterrupted run's")
        tensors = sum(len(state) for state in straight.values())
        return (f"killed at step 12, resumed from step 10: final weights bitwise equal "
                f"({len(straight)} models, {tensors} tensors compared)")

    def host_syncs():
        if cpu:
            raise Skip("torch.cuda.set_sync_debug_mode needs CUDA")
        need(2, "codistillation")
        proc = codistill(["train", "--nproc", str(world), "--out", str(work / "syncs"), "--overwrite",
                          *sum((["--set", s] for s in [*DIGITS, "codistill.n_models=2", "train.steps=12",
                                                       # the micro-batch loop, grad norm and clipping too
                                                       "train.accumulate=2", "optim.clip_norm=1.0",
                                                       f"dist.backend={backend}", *fast]), [])],
                         env={"CODISTILL_SYNC_DEBUG": "1"})
        warnings = [ln for ln in proc.stderr.splitlines() if "synchronizing" in ln.lower()]
        if proc.returncode != 0 or warnings:
            raise RuntimeError(warnings[0] if warnings else proc.stderr.strip().splitlines()[-1:])
        return "no synchronizing call inside the training step"

    def fp16_scaler():
        s = train(work / "fp16", world, ["codistill.n_models=1", "train.steps=20", "train.precision=fp16",
                                          "train.accumulate=2", "optim.clip_norm=1.0"], backend)
        rows = [json.loads(line) for line in (work / "fp16" / "model_0" / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in rows if "grad_norm" in r]
        if not logged or any(r["grad_norm"] is None or r["peak_memory_mib"] <= 0 for r in logged):
            raise RuntimeError(f"log lines without grad_norm / peak memory: {logged[:1]}")
        return (f"fp16 + GradScaler, accumulate 2, clip 1.0: val acc {s['models'][0]['val_accuracy']:.2f}, "
                f"{logged[-1]['skipped_steps']} skipped updates, peak {logged[-1]['peak_memory_mib']:.0f} MiB")

    def sharded():
        # One GPU (NCCL allows one rank per GPU): one model sharded over k = 1, which still runs
        # fully_shard, DTensor parameters, the DCP checkpoint and the export on CUDA. The CPU dry
        # run shards for real: 2 models x 2 gloo workers.
        workers = 4 if cpu else world
        n = 2 if workers >= 2 else 1
        sets = [f"codistill.n_models={n}", "train.steps=20", *(["codistill.exchange_delay=2"] if n > 1 else []),
                *fast]
        ddp = train(work / "ddp_twin", workers, sets, backend)
        fsdp = train(work / "fsdp", workers, [*sets, "train.parallel=fsdp"], backend)
        gap = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(ddp["models"], fsdp["models"]))
        if gap > 0.05:
            raise RuntimeError(f"train.parallel=fsdp ends {gap:.4f} away from its DDP twin's validation loss")
        proc = codistill(["export", str(work / "fsdp"), *(["--ensemble"] if n > 1 else [])])
        if proc.returncode != 0:
            raise RuntimeError(f"export failed: {proc.stderr.strip().splitlines()[-1:]}")
        ratio = (f"exchange bytes x{fsdp['bytes_per_worker']['exchange'] / ddp['bytes_per_worker']['exchange']:.3f} "
                 "of DDP's (1/k plus whole buffers)" if n > 1 else "one model, FSDP over 1 GPU")
        return (f"{n} x {workers // n}: val loss within {gap:.4f} of DDP, {ratio}, peak memory "
                f"{fsdp['peak_memory_mib']:.0f} vs {ddp['peak_memory_mib']:.0f} MiB, "
                f"{'ensemble' if n > 1 else 'model'} exported")

    def offload():
        need(2, "sharded codistillation with offloaded teachers")
        base = ["codistill.n_models=2", "train.steps=12", "train.parallel=fsdp", "train.deterministic=true", *fast]
        resident = train(work / "fsdp_resident", world, base, backend)
        off = train(work / "fsdp_offload", world, [*base, "codistill.teacher_offload=true"], backend)
        if [m["val_loss"] for m in off["models"]] != [m["val_loss"] for m in resident["models"]]:
            raise RuntimeError("codistill.teacher_offload changed the validation losses")
        ddp = ["codistill.n_models=2", "train.steps=12", "codistill.exchange_delay=2", "train.deterministic=true", *fast]
        ddp_off = train(work / "ddp_offload", world, [*ddp, "codistill.teacher_offload=true"], backend)
        ddp_res = train(work / "ddp_resident", world, ddp, backend)
        if [m["val_loss"] for m in ddp_off["models"]] != [m["val_loss"] for m in ddp_res["models"]]:
            raise RuntimeError("codistill.teacher_offload (DDP, asynchronous exchange) changed the validation losses")
        # DiLoCo's outer step on the CPU: the same arithmetic on another device, up to fused-multiply-add
        diloco = ["codistill.n_models=2", "train.steps=12", "codistill.method=diloco", "train.parallel=fsdp", *fast]
        on_device = train(work / "diloco_device", world, diloco, backend)
        on_cpu = train(work / "diloco_cpu", world, [*diloco, "outer.state_device=cpu"], backend)
        gap = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(on_device["models"], on_cpu["models"]))
        if gap > 1e-3:
            raise RuntimeError(f"outer.state_device=cpu ends {gap:.2e} away from the device run's validation loss")
        return (f"offloaded teachers bitwise equal (fsdp and ddp), peak {off['peak_memory_mib']:.0f} vs "
                f"{resident['peak_memory_mib']:.0f} MiB (fsdp), {ddp_off['peak_memory_mib']:.0f} vs "
                f"{ddp_res['peak_memory_mib']:.0f} MiB (ddp); DiLoCo outer state on the CPU within {gap:.1e}")

    def hsdp_resize():
        workers = 4 if cpu else world  # the CPU dry run starts 4 gloo processes
        if workers < 4:
            raise Skip(f"HSDP 2 x 2 and a 2 x 2 -> 2 x 1 resume need 4 workers, NCCL one GPU each; this machine has {g}")
        one = ["codistill.n_models=1", "train.steps=12", "model.name=mlp", *fast]
        ddp = train(work / "hsdp_ddp", 4, one, backend)
        hsdp = train(work / "hsdp", 4, [*one, "train.parallel=fsdp", "train.shard_size=2"], backend)
        gap = abs(ddp["models"][0]["val_loss"] - hsdp["models"][0]["val_loss"])
        if gap > 0.05:
            raise RuntimeError(f"HSDP 2 x 2 ends {gap:.4f} away from DDP's validation loss")
        sets = ["codistill.n_models=2", "train.steps=12", "train.checkpoint_every=5", "model.name=mlp",
                "train.parallel=fsdp", *fast]
        train(work / "resize", 4, sets, backend, env={"CODISTILL_FAULT": "kill@1:7"}, expect_ok=False)
        proc = codistill(["train", "--resume", str(work / "resize"), "--nproc", "2"])
        if proc.returncode != 0:
            raise RuntimeError(f"resume at 2 x 1 failed: {proc.stderr.strip().splitlines()[-1:]}")
        done = json.loads((work / "resize" / "summary.json").read_text())["steps"]
        return f"HSDP 2 x 2 within {gap:.4f} of DDP's val loss; 2 x 2 killed at step 7, resumed 2 x 1 to step {done}"

    def resnet50():
        args = [sys.executable, "-m", "codistill.bench.gpu_resnet50", "--out", str(work / "resnet50"),
                "--repeats", "3", "--iters", "5", "--warmup", "5"]
        if cpu:
            args += ["--allow-cpu", "--model", "resnet18", "--image-size", "32", "--batch", "4", "--classes", "10"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
        table = (work / "resnet50" / "gpu_resnet50.md").read_text().strip().splitlines()
        return table[-1] if table else "table written"

    return [("allreduce_nccl_amp_channels_last", allreduce), ("codistill_sync_exchange_stall", codistill_sync),
            ("codistill_async_exchange", codistill_async), ("storage_exchange_2_replicas", storage),
            ("checkpoint_kill_resume_bitwise", resume), ("no_host_sync_in_step", host_syncs),
            ("fp16_grad_scaler_accumulate_clip", fp16_scaler), ("fsdp_matches_ddp_and_exports", sharded),
            ("teacher_offload_and_diloco_cpu_state", offload), ("hsdp_and_resume_at_another_k", hsdp_resize),
            ("resnet50_throughput", resnet50)]


def run(cpu: bool, out: Path, only: list[str] | None = None) -> list[dict]:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    device = "cpu (gloo dry run)" if cpu else f"{gpus()} x {torch.cuda.get_device_name(0)}"
    print(f"gpu_check: torch {torch.__version__}, {device}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, fn in checks(cpu, Path(tmp)):
            if only and name not in only:
                continue
            start = time.perf_counter()
            try:
                status, detail = "ok", fn()
            except Skip as e:
                status, detail = "skipped", str(e)
            except Exception as e:  # noqa: BLE001 - every check reports, none stops the others
                status, detail = "FAILED", f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
            rows.append({"check": name, "status": status, "detail": detail, "seconds": round(seconds, 1)})
            print(f"{status:7s} {name} ({seconds:.0f} s): {detail}", flush=True)
    result = {"device": device, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d"), "checks": rows}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    return rows


def markdown(result: dict) -> str:
    lines = [f"Run {result['time']} on {result['device']}, torch {result['torch']}.", "",
             "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['detail']} |" for r in result["checks"]]
    return "\n".join(lines) + "\n"


def replace_section(doc: Path, text: str) -> None:
    content = doc.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"gpu_check: {doc} has no {BEGIN} ... {END} section to replace")
    head, rest = content.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + text + rest[rest.index(END):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codistill.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the checks' logic on CPU with gloo (no GPU needed)")
    p.add_argument("--out", default="runs/bench-gpu-check", help="directory for gpu_check.md/.json")
    p.add_argument("--doc", help="replace the gpu-check section of this markdown file")
    p.add_argument("--only", nargs="*", help="run only these checks")
    args = p.parse_args(argv)
    if not args.cpu and gpus() == 0:
        print("gpu_check: no CUDA device is visible; nothing was checked (--cpu runs the logic on CPU)",
              file=sys.stderr)
        return 2
    rows = run(args.cpu, Path(args.out), args.only)
    if args.doc and not args.cpu:
        replace_section(Path(args.doc), (Path(args.out) / "gpu_check.md").read_text())
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
