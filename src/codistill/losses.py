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


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                      temperature: float = 1.0) -> torch.Tensor:
    """D(student, teacher) for logits of shape (N, C), averaged over the N rows.

    kl:  tau^2 * sum_c p_t[c] * (log p_t[c] - log p_s[c]), p = softmax(logits / tau)
    ce:  tau^2 * -sum_c p_t[c] * log p_s[c] (= kl + tau^2 * entropy of the teacher)
    mse: mean over rows and classes of (z_s - z_t)^2, on raw logits (no temperature)
    """
    teacher = teacher.detach()
    if kind == "mse":
        return F.mse_loss(student, teacher.to(student.dtype))
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown distillation loss {kind!r}; allowed: {', '.join(DISTILL_LOSSES)}")
    tau = float(temperature)
    log_p_student = F.log_softmax(student / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher.to(student.dtype) / tau, dim=-1)
    if kind == "kl":
        loss = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    else:
        loss = -(log_p_teacher.exp() * log_p_student).sum(-1).mean()
    return loss * tau * tau


def codistillation_loss(student: torch.Tensor, teachers: Sequence[torch.Tensor], target: torch.Tensor,
                        alpha: float = 1.0, kind: str = "kl", temperature: float = 1.0,
                        label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Task loss plus alpha times the mean distillation loss to each teacher.

    student: (N, C) logits; teachers: n-1 tensors (N, C); target: (N,) class indices. Rows whose
    target is `ignore_index` (padding in translation) are left out of both terms.
    Returns {"total", "task", "distill"}; "distill" is the unweighted mean over teachers (0 when
    there are none), so logs show it whatever alpha is.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    task = F.cross_entropy(student, target, label_smoothing=label_smoothing, ignore_index=ignore_index)
    keep = target != ignore_index
    if not bool(keep.all()):
        student = student[keep]
        teachers = [t[keep] for t in teachers]
    if len(teachers) == 0:
        distill = student.new_zeros(())
    else:
        distill = torch.stack([distillation_loss(student, t, kind, temperature) for t in teachers]).mean()
    return {"total": task + alpha * distill, "task": task, "distill": distill}
