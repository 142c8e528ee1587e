"""Gradient accumulation, clipping and the gradient norm, fp16 with loss scaling, throughput fields,
the profiler (train.accumulate, optim.clip_norm, train.precision, train.profile)."""

from __future__ import annotations

import json

import pytest
import torch

from mp_helpers import digits_config, run_workers

pytestmark = pytest.mark.timeout(600)

STEPS = 6
METHODS = {  # name -> config overrides; 4 workers: 1 x 4 or 2 models x 2 replicas
    "allreduce": {"codistill__n_models": 1},
    "codistill": {"codistill__n_models": 2},
    "diloco": {"codistill__n_models": 2, "codistill__method": "diloco"},
    "localsgd": {"codistill__n_models": 2, "codistill__method": "localsgd"},
}


def _params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _accumulation_worker(rank, world, configs):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    out = {}
    for name, cfg in configs.items():
        tr = Trainer(cfg, ctx, None)
        tr.fit()
        out[name] = {"params": _params(tr.model), "allreduce_bytes": torch.tensor(tr.counter.allreduce_sent),
                     "steps": torch.tensor(tr.step), "teacher_steps": torch.tensor(sorted(tr.teachers.versions.values()) or [-1])}
    return out


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b_for_every_method(tmp_path):
    """Two micro-batches of 16 and one batch of 32 give the same models after 6 steps, with a
    warm-up schedule and exchanges / outer steps every 2 steps, for all four methods (an MLP: no
    BatchNorm sees the batch split). The gradient all-reduce runs once per step (bytes equal)."""
    configs = {}
    for name, overrides in METHODS.items():
        common = dict(model__name="mlp_tiny", train__steps=STEPS, train__eval_every=1000, codistill__exchange_every=2,
                      schedule__name="cosine", schedule__warmup_epochs=0.2, data__fraction=0.5, **overrides)
        configs[f"{name}/k2"] = digits_config(data__batch_size=16, train__accumulate=2, **common)
        configs[f"{name}/k1"] = digits_config(data__batch_size=32, **common)
    # Without accumulation the K=2 run would train on batches of 16: it must differ from this one.
    configs["allreduce/b16"] = digits_config(data__batch_size=16, **{**dict(
        model__name="mlp_tiny", train__steps=STEPS, train__eval_every=1000, schedule__name="cosine",
        schedule__warmup_epochs=0.2, data__fraction=0.5), **METHODS["allreduce"]})
    results = run_workers(_accumulation_worker, 4, tmp_path, (configs,))
    for rank, res in enumerate(results):
        for name in METHODS:
            k2, k1 = res[f"{name}/k2"], res[f"{name}/k1"]
            assert int(k2["steps"]) == int(k1["steps"]) == STEPS
            torch.testing.assert_close(k2["params"], k1["params"], rtol=1e-5, atol=1e-6,
                                       msg=f"{name} rank {rank}")
            assert torch.equal(k2["teacher_steps"], k1["teacher_steps"])
            assert float(k2["allreduce_bytes"]) == float(k1["allreduce_bytes"]) > 0  # no_sync on the first
        assert not torch.allclose(res["allreduce/b16"]["params"], res["allreduce/k2"]["params"], atol=1e-4)


def _fp16_worker(rank, world, cfg):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, None)
    # A scale no fp16 gradient survives: the first updates overflow and are skipped, the scale halving each time.
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -12)
    batches, _ = tr.task.train_batches(tr.topo, tr.seed)
    rows = []
    for _ in range(cfg.train.steps):
        before = _params(tr.model)
        step = tr.step
        tr.train_step(next(batches))
        rows.append({"step": step, "lr": tr.optimizer.param_groups[0]["lr"], "skipped": tr.skipped_steps,
                     "changed": not torch.equal(before, _params(tr.model)), "scale": tr.scaler.get_scale()})
    tr.maybe_exchange()
    return {"rows": json.dumps(rows), "step": torch.tensor(tr.step),
            "teacher_steps": torch.tensor(sorted(tr.teachers.versions.values())),
            "lr_at": torch.tensor([tr.schedules.lr(s) for s in range(cfg.train.steps)], dtype=torch.float64),
            "scaler": json.dumps({k: float(v) for k, v in tr.scaler.state_dict().items()})}


def test_fp16_scaler_skipped_updates_count_as_steps_for_schedules_and_exchange(tmp_path):
    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=2, train__steps=5, train__precision="fp16",
                        schedule__name="cosine", schedule__warmup_epochs=0.1)
    res = run_workers(_fp16_worker, 2, tmp_path, (cfg,))[0]
    rows = json.loads(res["rows"])
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and int(res["step"]) == 5
    skipped = [r for r in rows if not r["changed"]]
    assert 1 <= len(skipped) < 5 and rows[-1]["skipped"] == len(skipped)  # counted, then training resumes
    assert all(r["step"] == i for i, r in enumerate(skipped))  # the overflowing first ones
    # Every step, skipped or not, took the schedule's LR for its own step number.
    assert [r["lr"] for r in rows] == pytest.approx(res["lr_at"].tolist())
    assert res["teacher_steps"].tolist() == [4]  # exchanges at 0, 2, 4 whatever was skipped
    assert json.loads(res["scaler"])["scale"] < 2.0 ** 40


def _clip_worker(rank, world, cfg):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, None)
    batches, _ = tr.task.train_batches(tr.topo, tr.seed)
    before = _params(tr.model)
    tr.train_step(next(batches))
    grad_norm, _ = tr.window.grad_norm()
    return {"delta": (_params(tr.model) - before).norm(), "grad_norm": torch.tensor(grad_norm),
            "lr": torch.tensor(tr.optimizer.param_groups[0]["lr"])}


def test_clipping_by_the_global_norm_over_the_model_group(tmp_path):
    """Plain SGD (no momentum, no weight decay): one update moves the parameters by exactly
    lr x clip_norm when the gradient's norm is larger, on both replicas (1 model x 2 workers)."""
    cfg = digits_config(codistill__n_models=1, train__steps=1, optim__momentum=0.0, optim__weight_decay=0.0,
                        optim__clip_norm=1e-3)
    a, b = run_workers(_clip_worker, 2, tmp_path, (cfg,))
    assert float(a["grad_norm"]) == float(b["grad_norm"]) > 1e-3  # the all-reduced gradient's norm
    for r in (a, b):
        assert float(r["delta"]) == pytest.approx(float(r["lr"]) * 1e-3, rel=1e-4)


def test_clip_grad_norm_matches_torch_and_reports_the_norm_before_clipping():
    from codistill.optim_step import clip_grad_norm

    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 5)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
    norm = clip_grad_norm(list(b.parameters()), 0.5)
    assert torch.equal(norm, expected)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    unclipped = [p.grad.clone() for p in b.parameters()]
    assert clip_grad_norm(list(b.parameters()), None) == pytest.approx(0.5, rel=1e-5)  # no clip: norm only
    assert all(torch.equal(g, p.grad) for g, p in zip(unclipped, b.parameters()))


def test_grad_sync_paused_picks_the_wrappers_own_switch():
    from codistill.optim_step import grad_sync_paused

    calls = []

    class Sharded(torch.nn.Linear):  # FSDP2's interface
        def set_requires_gradient_sync(self, flag):
            calls.append(flag)

    with grad_sync_paused(Sharded(2, 2)):
        assert calls == [False]
    assert calls == [False, True]
    with grad_sync_paused(torch.nn.Linear(2, 2)):  # one replica: nothing to pause
        pass


def test_bf16_and_fp16_autocast_run_student_and_teachers_in_that_type():
    from codistill.codistillation import Codistillation  # noqa: F401  (teacher_precision accepts fp16)
    from codistill.optim_step import autocast

    lin = torch.nn.Linear(4, 4)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        with autocast(torch.device("cpu"), precision):
            assert lin(torch.randn(2, 4)).dtype == dtype


def test_flop_counts_follow_the_documented_formulas():
    from codistill.models import build_model
    from codistill.throughput import flops_per_target, speed

    gpt = build_model("gpt_tiny", 1000, ())
    n = sum(p.numel() for p in gpt.parameters()) - gpt.positions.weight.numel()
    assert flops_per_target(gpt, 128) == 6 * n + 12 * 4 * 128 * 128
    seq = build_model("transformer_tiny", 1000, ())
    n = sum(p.numel() for p in [*seq.encoder.parameters(), *seq.decoder.parameters()]) + 1000 * 128
    assert flops_per_target(seq, 20) == 6 * n + 12 * 128 * 20 * (2 + 2 * 2)
    assert flops_per_target(build_model("mlp_tiny", 10, (1, 8, 8)), None) is None
    assert speed(1000.0, 2e9, 4.0) == {"samples_per_s_per_worker": 1000.0, "tflops_per_worker": 2.0, "mfu": 0.5}
    assert speed(1000.0, None, None)["mfu"] is None
