"""Cheaper teachers (issue 29): distill on a fraction of the batch, teachers every m-th step,
bf16 / int8 teachers, top-k KL for language models; each a setting of `Codistillation`."""

from __future__ import annotations

import math

import pytest
import torch

from codistill.cli import main
from codistill.losses import codistillation_loss, distillation_per_row, topk_kl_per_row, topk_teacher

pytestmark = pytest.mark.timeout(120)


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """A one-process gloo group: a Codistillation of one model group whose teachers come through
    storage (so one process holds them); no peer publishes, so the teachers keep their own init."""
    from codistill.distributed import init_distributed, shutdown

    tmp = tmp_path_factory.mktemp("pg")
    init_distributed("gloo", threads=1, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
    yield tmp
    shutdown()


def _codist(tmp, n=2, **options):
    import uuid

    import codistill as cd

    where = tmp / uuid.uuid4().hex  # a fresh exchange location for each
    c = cd.Codistillation(_net, n_models=n, every=10**6, alpha=0.5, exchange="storage", exchange_dir=where,
                          model_index=0, seed=1, **options)
    c.maybe_exchange()
    c.teachers.mark_received(0)  # as after an exchange with peers: every teacher takes part
    return c


def _batch(rows=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 4, generator=g), torch.randint(5, (rows,), generator=g)


# -- top-k KL ---------------------------------------------------------------------------------------

def test_topk_kl_with_k_equal_to_vocabulary_is_the_full_kl():
    torch.manual_seed(0)
    student = torch.randn(12, 9, requires_grad=True)
    teacher = torch.randn(12, 9)
    full = distillation_per_row(student, teacher, "kl", 2.0)
    topk = topk_kl_per_row(student, [topk_teacher(teacher, 9, 2.0)], 2.0)
    torch.testing.assert_close(topk, full, atol=1e-5, rtol=1e-5)
    g_full, = torch.autograd.grad(full.sum(), student)
    g_topk, = torch.autograd.grad(topk.sum(), student)
    torch.testing.assert_close(g_topk, g_full, atol=1e-5, rtol=1e-5)


def test_topk_kl_bucket_formula_on_a_hand_example():
    p_t, p_s = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
    teacher, student = torch.tensor([p_t]).log(), torch.tensor([p_s]).log()
    # k = 1: class 0 kept; the bucket holds 0.5 of the teacher's mass and 0.8 of the student's
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    got = topk_kl_per_row(student, [topk_teacher(teacher, 1)])
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # k = 2: classes 0 and 1 kept; buckets 0.2 and 0.6
    expected2 = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6)
    assert topk_kl_per_row(student, [topk_teacher(teacher, 2)]).item() == pytest.approx(expected2, abs=1e-6)


def test_topk_teacher_keeps_k_columns_not_the_vocabulary():
    t = topk_teacher(torch.randn(100, 1000), 8)
    assert t.log_p.shape == (100, 8) and t.index.shape == (100, 8) and t.log_rest.shape == (100,)


def test_codistillation_topk_equals_full_loss_when_k_is_the_vocabulary(single_process):
    x, y = _batch()
    full, topk = _codist(single_process), _codist(single_process, teacher_topk=5)
    a = full.loss(full.model(x), y, teacher_inputs=x)
    b = topk.loss(topk.model(x), y, teacher_inputs=x)
    assert a["distill"].item() > 0
    torch.testing.assert_close(b["distill"], a["distill"], atol=1e-5, rtol=1e-5)


# -- fraction and every m-th step -------------------------------------------------------------------

def test_defaults_give_todays_loss_exactly(single_process):
    x, y = _batch()
    c = _codist(single_process, n=3, distill_fraction=1.0, teacher_every=1)
    student = c.model(x)
    with torch.no_grad():
        teachers = [m(x) for m in c.teachers.modules.values()]
    expected = codistillation_loss(student, teachers, y, alpha=0.5)
    got = c.loss(student, y, teacher_inputs=x)
    for key in ("total", "task", "distill"):
        assert torch.equal(got[key], expected[key]), key


def test_distill_fraction_uses_exactly_the_leading_rows(single_process):
    x, y = _batch(8)
    c = _codist(single_process, distill_fraction=0.3)  # ceil(0.3 * 8) = 3 rows
    seen = []
    teacher = next(iter(c.teachers.modules.values()))
    teacher.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    student = c.model(x)
    got = c.loss(student, y, teacher_inputs=x)
    assert len(seen) == 1 and torch.equal(seen[0], x[:3])
    with torch.no_grad():
        t = teacher(x[:3])
    expected = distillation_per_row(student[:3], t).mean()
    assert torch.equal(got["distill"], expected)
    assert torch.equal(got["task"], torch.nn.functional.cross_entropy(student, y))  # task: the whole batch


def test_teacher_every_m_runs_teachers_on_steps_0_m_2m(single_process):
    c = _codist(single_process, teacher_every=3)
    calls = []
    next(iter(c.teachers.modules.values())).register_forward_hook(lambda *_: calls.append(c.step))
    optimizer = torch.optim.SGD(c.model.parameters(), lr=0.01)
    distill = []
    with c.attach(optimizer):
        for _ in range(7):
            x, y = _batch()
            out = c.loss(c.model(x), y, teacher_inputs=x)
            distill.append(out["distill"].item())
            optimizer.zero_grad()
            out["total"].backward()
            optimizer.step()
    assert calls == [0, 3, 6]
    assert [d > 0 for d in distill] == [s % 3 == 0 for s in range(7)]  # absent on the other steps


# -- lower precision --------------------------------------------------------------------------------

def test_bf16_teachers_run_with_bf16_weights(single_process):
    x, y = _batch()
    ref, c = _codist(single_process), _codist(single_process, teacher_dtype="bf16")
    low = c.teacher_logits(x)
    runs = [held for _, held in c.low_precision.copies.values()]
    assert runs and all(p.dtype == torch.bfloat16 for r in runs for p in r.parameters())
    assert all(p.dtype == torch.float32 for m in c.teachers.modules.values() for p in m.parameters())
    assert low[0].dtype == torch.bfloat16
    torch.testing.assert_close(low[0].float(), ref.teacher_logits(x)[0], atol=0.05, rtol=0.05)


def test_bf16_copy_follows_new_teacher_weights(single_process):
    x, _ = _batch()
    c = _codist(single_process, teacher_dtype="bf16")
    before = c.teacher_logits(x)[0]
    teacher = next(iter(c.teachers.modules.values()))
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2)
    c.teachers.mark_received(5)  # a new version: the copy is refreshed
    after = c.teacher_logits(x)[0]
    with torch.no_grad():
        expected = teacher(x)
    assert not torch.allclose(before.float(), after.float())
    torch.testing.assert_close(after.float(), expected, atol=0.1, rtol=0.05)


def test_int8_teachers_quantize_linear_layers_and_stay_close(single_process):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    x, _ = _batch(64)
    ref, c = _codist(single_process), _codist(single_process, teacher_dtype="int8")
    low = c.teacher_logits(x)[0]
    run = next(iter(c.low_precision.copies.values()))[1]
    assert sum(isinstance(m, DynamicQuantizedLinear) for m in run.modules()) == 2
    exact = ref.teacher_logits(x)[0]
    assert not torch.equal(low, exact)  # really quantized
    torch.testing.assert_close(low, exact, atol=0.05, rtol=0.05)


# -- bad values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, fragment", [
    ("codistill.distill_fraction=0", "distill_fraction"), ("codistill.distill_fraction=1.5", "distill_fraction"),
    ("codistill.teacher_every=0", "teacher_every"), ("codistill.teacher_dtype=int4", "teacher_dtype"),
    ("codistill.teacher_topk=0", "teacher_topk"),
])
def test_bad_teacher_settings_are_one_line_errors(tmp_path, capsys, setting, fragment):
    code = main(["train", "--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", setting,
                 "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    assert fragment in lines[0]
    assert not (tmp_path / "run").exists()


def test_int8_teacher_runs_torch_transformer_layers_and_restores_the_fast_path():
    from codistill.cheap_teachers import LowPrecisionTeachers
    from codistill.exchange import freeze_as_teacher

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    teacher = freeze_as_teacher(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(3, 5, 16)
    before = torch.backends.mha.get_fastpath_enabled()
    run = LowPrecisionTeachers("int8").runnable(1, teacher, 0)
    with torch.no_grad():  # eval + no_grad: where torch takes the fused path that reads Linear.weight
        got, exact = run(x), teacher(x)
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert not torch.equal(got, exact)
    torch.testing.assert_close(got, exact, atol=0.1, rtol=0.1)
