"""The codistillation loss against hand formulas and torch's own functions."""

import math

import pytest
import torch
import torch.nn.functional as F

from codistill.losses import codistillation_loss, distillation_loss


def _logits(seed, n=5, c=7):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kl_is_teacher_to_student_batchmean_times_tau_squared(tau):
    s, t = _logits(0), _logits(1)
    ps, pt = F.softmax(s / tau, -1), F.softmax(t / tau, -1)
    # Hand formula: tau^2 * mean over rows of sum_c p_t log(p_t / p_s).
    hand = tau**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert torch.allclose(distillation_loss(s, t, "kl", tau), hand, atol=1e-6)
    # torch's kl_div with the teacher as target, batchmean (never divided by the class count).
    ref = F.kl_div(F.log_softmax(s / tau, -1), pt, reduction="batchmean") * tau**2
    assert torch.allclose(distillation_loss(s, t, "kl", tau), ref, atol=1e-6)


def test_kl_direction_is_not_symmetric_and_matches_forward_kl():
    s = torch.tensor([[4.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    forward = distillation_loss(s, t, "kl")
    reverse = distillation_loss(t, s, "kl")
    ps, pt = F.softmax(s, -1)[0], F.softmax(t, -1)[0]
    assert math.isclose(forward.item(), sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(3)), rel_tol=1e-5)
    assert not math.isclose(forward.item(), reverse.item(), rel_tol=1e-2)


def test_kl_of_identical_logits_is_zero_and_positive_otherwise():
    s = _logits(3)
    assert distillation_loss(s, s.clone(), "kl").abs() < 1e-6
    assert distillation_loss(s, _logits(4), "kl") > 0


def test_mse_is_mean_squared_logit_difference():
    s, t = _logits(0), _logits(1)
    assert torch.allclose(distillation_loss(s, t, "mse"), ((s - t) ** 2).mean())
    assert torch.allclose(distillation_loss(s, t, "mse", temperature=5.0), F.mse_loss(s, t))  # tau unused


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_ce_is_soft_target_cross_entropy_and_kl_plus_teacher_entropy(tau):
    s, t = _logits(0), _logits(1)
    pt = F.softmax(t / tau, -1)
    hand = -(pt * F.log_softmax(s / tau, -1)).sum(-1).mean() * tau**2
    ce = distillation_loss(s, t, "ce", tau)
    assert torch.allclose(ce, hand, atol=1e-6)
    assert torch.allclose(ce, F.cross_entropy(s / tau, pt) * tau**2, atol=1e-6)
    entropy = -(pt * pt.log()).sum(-1).mean() * tau**2
    assert torch.allclose(ce, distillation_loss(s, t, "kl", tau) + entropy, atol=1e-5)


def test_unknown_distillation_loss_is_rejected():
    with pytest.raises(ValueError, match="allowed"):
        distillation_loss(_logits(0), _logits(1), "l1")


def test_total_is_task_plus_alpha_times_mean_over_teachers():
    s, t1, t2 = _logits(0), _logits(1), _logits(2)
    y = torch.tensor([0, 1, 2, 3, 4])
    out = codistillation_loss(s, [t1, t2], y, alpha=0.7, kind="kl", label_smoothing=0.1)
    task = F.cross_entropy(s, y, label_smoothing=0.1)
    distill = (distillation_loss(s, t1) + distillation_loss(s, t2)) / 2
    assert torch.allclose(out["task"], task)
    assert torch.allclose(out["distill"], distill)
    assert torch.allclose(out["total"], task + 0.7 * distill)


def test_no_teachers_is_plain_cross_entropy():
    s, y = _logits(0), torch.tensor([0, 1, 2, 3, 4])
    out = codistillation_loss(s, [], y, alpha=1.0)
    assert torch.equal(out["total"], F.cross_entropy(s, y))
    assert out["distill"].item() == 0.0


def test_gradients_reach_only_the_student():
    s = _logits(0).requires_grad_()
    t = _logits(1).requires_grad_()  # even a teacher tensor that tracks gradients is detached
    y = torch.tensor([0, 1, 2, 3, 4])
    for kind in ("kl", "mse", "ce"):
        s.grad = t.grad = None
        codistillation_loss(s, [t], y, alpha=1.0, kind=kind)["total"].backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None


def test_student_gradient_of_kl_is_softmax_difference():
    # d/ds KL(p_t || softmax(s)) = (softmax(s) - p_t) / N with batchmean; tau = 1.
    s = _logits(0).requires_grad_()
    t = _logits(1)
    distillation_loss(s, t, "kl").backward()
    expected = (F.softmax(s.detach(), -1) - F.softmax(t, -1)) / s.shape[0]
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_padding_rows_are_ignored_by_both_terms():
    s, t = _logits(0), _logits(1)
    y = torch.tensor([0, -100, 2, -100, 4])
    keep = y != -100
    out = codistillation_loss(s, [t], y, alpha=1.0)
    assert torch.allclose(out["task"], F.cross_entropy(s[keep], y[keep]))
    assert torch.allclose(out["distill"], distillation_loss(s[keep], t[keep]))


def test_negative_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        codistillation_loss(_logits(0), [], torch.zeros(5, dtype=torch.long), alpha=-1.0)


def test_loss_with_padding_never_synchronizes_with_the_host(monkeypatch):
    """On CUDA, bool()/item()/tolist() and boolean-mask indexing wait for the GPU every step; the
    loss must get by with masked reductions (the padded rows still count for nothing)."""
    s, t = _logits(0).requires_grad_(), _logits(1)
    y = torch.tensor([1, -100, 3, -100, 0])
    expected = codistillation_loss(s, [t], y, alpha=0.5)["total"]

    def forbidden(*_a, **_k):
        raise AssertionError("host sync in the loss")

    for name in ("__bool__", "item", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    out = codistillation_loss(s, [t], y, alpha=0.5)
    out["total"].backward()
    monkeypatch.undo()
    assert torch.allclose(out["total"], expected)
    keep = y != -100
    assert torch.allclose(out["distill"], distillation_loss(s[keep], t[keep]), atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_mean_over_teachers_matches_each_teacher_in_value_and_gradient(kind):
    torch.manual_seed(0)
    s, y = torch.randn(7, 11, dtype=torch.float64), torch.randint(0, 11, (7,))
    teachers = [torch.randn(7, 11, dtype=torch.float64) for _ in range(3)]
    a = s.clone().requires_grad_()
    out = codistillation_loss(a, teachers, y, alpha=1.0, kind=kind, temperature=2.0)
    out["total"].backward()
    b = s.clone().requires_grad_()
    reference = torch.stack([distillation_loss(b, t, kind, 2.0) for t in teachers]).mean()
    (F.cross_entropy(b, y) + reference).backward()
    assert torch.allclose(out["distill"], reference, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_kl_to_many_teachers_keeps_no_per_teacher_copy_for_backward():
    # A language model's logits are tokens x vocabulary per teacher: what autograd keeps for the
    # backward pass must not grow with the number of teachers.
    def saved_bytes(m):
        s = torch.randn(64, 1000).requires_grad_()
        teachers = [torch.randn(64, 1000) for _ in range(m)]
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            codistillation_loss(s, teachers, torch.zeros(64, dtype=torch.long), kind="kl")
        return sum(sizes)

    assert saved_bytes(4) == saved_bytes(2)
