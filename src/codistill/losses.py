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
from typing import NamedTuple

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

    student: (N, C) logits; teachers: n-1 tensors (M, C) or `TopKTeacher`s of M rows, M <= N: the
    teachers' rows are the student's first M (distill_fraction < 1), the distillation term their mean;
    target: (N,) class indices. Rows whose
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
        rows = teacher_rows(teachers[0])  # distill_fraction < 1: the teachers saw the leading rows only
        if rows > student.shape[0]:
            raise ValueError(f"teachers' logits have {rows} rows, the student's only {student.shape[0]}")
        student_d, target_d = student[:rows], target[:rows]  # the same tensors when rows = N
        weight = (target_d != ignore_index).to(student.dtype)
        if isinstance(teachers[0], TopKTeacher):
            if kind != "kl":
                raise ValueError(f"top-k teachers need the kl distillation loss, got {kind!r}")
            per_row = topk_kl_per_row(student_d, teachers, temperature)
        else:
            per_row = mean_distillation_per_row(student_d, teachers, kind, temperature)
        distill = (per_row * weight).sum() / weight.sum().clamp_min(1)
    return {"total": task + alpha * distill, "task": task, "distill": distill}


def teacher_rows(teacher) -> int:
    return (teacher.log_p if isinstance(teacher, TopKTeacher) else teacher).shape[0]


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


class TopKTeacher(NamedTuple):
    """A teacher's distribution at temperature tau, kept as its top-k classes plus one bucket:
    log_p (N, k) log-probabilities of its k most likely classes, index (N, k) those classes,
    log_rest (N,) log of the mass outside them (-inf when k = C)."""
    log_p: torch.Tensor
    index: torch.Tensor
    log_rest: torch.Tensor


@torch.no_grad()
def topk_teacher(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """The (N, C) logits reduced to N x k numbers (plus N), so the teachers' logits need not be kept
    at tokens x vocabulary. k > C is taken as C."""
    z = logits.float() / float(temperature)
    k = min(k, z.shape[-1])
    log_z = z.logsumexp(-1)
    top, index = z.topk(k, dim=-1)
    log_rest = z.scatter(-1, index, float("-inf")).logsumexp(-1) - log_z  # exactly -inf when k = C
    return TopKTeacher(top - log_z.unsqueeze(-1), index, log_rest)


def topk_kl_per_row(student: torch.Tensor, teachers: Sequence[TopKTeacher], temperature: float = 1.0) -> torch.Tensor:
    """1/m sum_t KL_k(teacher_t || student) per row, shape (N,), times tau^2:

        KL_k(t || s) = sum_{c in K_t} p_t[c] (log p_t[c] - log p_s[c]) + r_t (log r_t - log r_s)

    K_t the teacher's k most likely classes, r = 1 - sum_{c in K_t} p[c] the mass outside them (the
    bucket), p = softmax(logits / tau). It is the KL between the two (k + 1)-outcome distributions,
    so 0 <= KL_k <= KL (data processing), equal to the full KL when k = C (r_t = 0)."""
    tau = float(temperature)
    log_p_student = F.log_softmax(student.float() / tau, dim=-1)
    total = log_p_student.new_zeros(student.shape[:-1])
    for t in teachers:
        log_p_s = log_p_student.gather(-1, t.index)
        p_t = t.log_p.exp()
        rest_t = t.log_rest.exp()
        rest_s = (1 - log_p_s.exp().sum(-1)).clamp_min(torch.finfo(log_p_s.dtype).tiny)
        bucket = torch.where(rest_t > 0, rest_t * (t.log_rest - rest_s.log()), torch.zeros_like(rest_t))
        total = total + (p_t * (t.log_p - log_p_s)).sum(-1) + bucket
    return total / len(teachers) * (tau * tau)
