"""The codistillation objective (Sodhani et al., Algorithm 1).

    L_i = L(y, f_i(x)) + alpha * 1/(n-1) * sum_{j != i} D(f_i(x), f_j(x))

f_j are stale teacher copies of the other models. Teacher logits never carry gradients: they are
detached here whatever the caller passes, so gradients reach only the student.

Direction of `kl`: D = tau^2 * KL(p_teacher || p_student) with p = softmax(logits / tau), i.e. the
teacher distribution is the target (Hinton et al. 2015; Zhang et al. 2018), averaged over the batch
("batchmean": summed over classes, never divided by the number of classes). tau^2 keeps the gradient
scale independent of tau.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target of positions scored by nothing (padding of sequence tasks); torch's default

DISTILL_LOSSES = ("kl", "mse", "ce")


def distillation_per_row(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                         temperature: float = 1.0) -> torch.Tensor:
    """D(student, teacher) of each row of (N, C) logits, shape (N,).

    kl:  tau^2 * sum_c p_t[c] * (log p_t[c] - log p_s[c]), p = softmax(logits / tau)
    ce:  tau^2 * -sum_c p_t[c] * log p_s[c] (= kl + tau^2 * entropy of the teacher)
    mse: mean over classes of (z_s - z_t)^2, on raw logits (no temperature)
    """
    teacher = teacher.detach().to(student.dtype)
    if kind == "mse":
        return (student - teacher).pow(2).mean(-1)
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown distillation loss {kind!r}; allowed: {', '.join(DISTILL_LOSSES)}")
    tau = float(temperature)
    log_p_student = F.log_softmax(student / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher / tau, dim=-1)
    p_teacher = log_p_teacher.exp()
    if kind == "kl":
        per_row = (p_teacher * (log_p_teacher - log_p_student)).sum(-1)
    else:
        per_row = -(p_teacher * log_p_student).sum(-1)
    return per_row * (tau * tau)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                      temperature: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """D(student, teacher) for logits of shape (N, C), averaged over the N rows (or over the rows
    where `weight`, a 0/1 float tensor of shape (N,), is 1). Never synchronizes with the host:
    the weighted mean divides by a tensor count instead of selecting rows with a boolean mask."""
    per_row = distillation_per_row(student, teacher, kind, temperature)
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(1)


def codistillation_loss(student: torch.Tensor, teachers: Sequence[torch.Tensor], target: torch.Tensor,
                        alpha: float = 1.0, kind: str = "kl", temperature: float = 1.0,
                        label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Task loss plus alpha times the mean distillation loss to each teacher.

    student: (N, C) logits; teachers: n-1 tensors (N, C); target: (N,) class indices. Rows whose
    target is `ignore_index` (padding in translation) are left out of both terms, by weighting
    rather than indexing: no host synchronization and no copy of the logits per teacher.
    Returns {"total", "task", "distill"}; "distill" is the unweighted mean over teachers (0 when
    there are none), so logs show it whatever alpha is.
    """
    if not alpha >= 0:  # also rejects NaN
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    task = F.cross_entropy(student, target, label_smoothing=label_smoothing, ignore_index=ignore_index)
    if len(teachers) == 0:
        distill = student.new_zeros(())
    else:
        weight = (target != ignore_index).to(student.dtype)
        per_row = mean_distillation_per_row(student, teachers, kind, temperature)
        distill = (per_row * weight).sum() / weight.sum().clamp_min(1)
    return {"total": task + alpha * distill, "task": task, "distill": distill}


def mean_distillation_per_row(student: torch.Tensor, teachers: Sequence[torch.Tensor], kind: str = "kl",
                              temperature: float = 1.0) -> torch.Tensor:
    """1/m sum_t D(student, teacher_t) per row, shape (N,), in memory that does not grow with m.

    For kl and ce the mean is taken against the teachers' mean probability p_bar (exact, since both
    are linear in p_teacher): mean_t KL(p_t || p_s) = mean_t sum_c p_t log p_t - sum_c p_bar log p_s.
    Autograd then keeps one student softmax and no per-teacher copy, which matters for language
    models, whose logits are tokens x vocabulary floats per teacher. mse is averaged per teacher.
    """
    if kind == "mse" or len(teachers) == 1:
        return torch.stack([distillation_per_row(student, t, kind, temperature) for t in teachers]).mean(0)
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown distillation loss {kind!r}; allowed: {', '.join(DISTILL_LOSSES)}")
    tau, m = float(temperature), len(teachers)
    with torch.no_grad():  # the teachers' side: no gradient, one teacher's temporaries at a time
        p_bar = torch.zeros_like(student)
        neg_entropy = student.new_zeros(student.shape[:-1])
        for t in teachers:
            log_p = F.log_softmax(t.detach().to(student.dtype) / tau, dim=-1)
            p = log_p.exp()
            p_bar.add_(p, alpha=1.0 / m)
            if kind == "kl":
                neg_entropy.add_((p * log_p).sum(-1), alpha=1.0 / m)
    cross = -(p_bar * F.log_softmax(student / tau, dim=-1)).sum(-1)
    return (neg_entropy + cross if kind == "kl" else cross) * (tau * tau)
