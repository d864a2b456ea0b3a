"""Pure loss functions of Di[M]O (docs/method.md#targets-and-the-divergence, docs/method.md#the-aux-update): the
distribution-matching logit gradient, the generator's surrogate loss and the auxiliary model's loss. Tensors in,
tensors out; no module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True for rows (first axis) in which every given tensor is finite.

    A row of floats is finite iff its max and min are (both propagate NaN, and an infinity is its row's max or
    min): two reductions instead of a bool copy of the whole (B, N, V) tensor, which on a CPU costs 20x more."""
    valid = None
    for t in tensors:
        flat = t.reshape(t.shape[0], -1)
        if flat.is_floating_point() and flat.shape[1] > 0:
            row_ok = torch.isfinite(flat.amax(dim=1)) & torch.isfinite(flat.amin(dim=1))
        else:
            row_ok = torch.isfinite(flat).all(dim=1)
        valid = row_ok if valid is None else valid & row_ok
    return valid


def distribution_matching_grad(
    teacher_logits: torch.Tensor,
    aux_logits: torch.Tensor,
    beta: float = 0.0,
    *,
    teacher_temperature: float = 1.0,
    aux_temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token gradient of the divergence between aux and teacher conditionals with respect to the logits.

    With p_T = softmax(teacher / T_t) and p_A = softmax(aux / T_a):

    * forward KL (beta = 0): g = p_A - p_T, the gradient of KL(p_T || softmax z) at z = aux logits;
    * reverse KL (beta = 1): g = p_A * (log p_A - log p_T - KL(p_A || p_T)), the gradient of KL(softmax z || p_T);
    * otherwise (negative beta included): g = (1 - beta) * FKL + beta * RKL (generalised Jeffreys).

    Args:
        teacher_logits: (B, N, V).
        aux_logits: (B, N, V).
        beta: mixing coefficient.
        teacher_temperature: T_t.
        aux_temperature: T_a.

    Returns:
        (B, N, V) float32 gradient (no graph).
    """
    with torch.no_grad():
        log_p_teacher = F.log_softmax(teacher_logits.float() / teacher_temperature, dim=-1)
        log_p_aux = F.log_softmax(aux_logits.float() / aux_temperature, dim=-1)
        p_aux = log_p_aux.exp()
        grad = torch.zeros_like(p_aux) if beta == 1.0 else (1.0 - beta) * (p_aux - log_p_teacher.exp())
        if beta != 0.0:
            log_ratio = log_p_aux - log_p_teacher
            # 0 * log 0 terms: where p_aux underflows to 0 the product is 0 (avoid -inf * 0 = nan).
            log_ratio = torch.where(p_aux > 0, log_ratio, torch.zeros_like(log_ratio))
            reverse_kl = (p_aux * log_ratio).sum(dim=-1, keepdim=True)
            grad = grad + beta * p_aux * (log_ratio - reverse_kl)
        return grad


def generator_loss(
    student_logits: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Surrogate 0.5 * ||z - sg(z - g)||^2 over masked positions, summed and divided by the batch size.

    Its gradient with respect to ``student_logits`` is exactly ``grad * mask[..., None] / B``. Rows with
    ``row_weight`` False (non-finite rows) contribute nothing, and B then counts only the valid rows.

    Args:
        student_logits: (B, N, V) z, with grad.
        grad: (B, N, V) per-token gradient g (treated as a constant).
        mask: (B, N) bool, positions that receive gradient.
        row_weight: optional (B,) bool of rows to keep.

    Returns:
        Scalar loss (float32).
    """
    b = student_logits.shape[0]
    keep = mask.bool()
    denom = float(b)
    if row_weight is not None:
        keep = keep & row_weight.bool()[:, None]
        denom = row_weight.float().sum().clamp_min(1.0)
    grad = torch.nan_to_num(grad.float().detach(), nan=0.0, posinf=0.0, neginf=0.0)
    z = student_logits.float()
    target = (z - grad).detach()
    # torch.where (not a multiplication) so a NaN in a dropped row cannot leak into the loss or its gradient.
    diff = torch.where(keep[..., None], z - target, torch.zeros_like(z))
    return 0.5 * diff.pow(2).sum() / denom


def aux_loss(
    aux_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float = 0.0,
    soft_targets: torch.Tensor | None = None,
    soft_weight: float = 0.0,
    soft_temperature: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Auxiliary (fake) model loss: (1 - a) * hard CE + a * soft KL, averaged over the masked positions.

    Args:
        aux_logits: (B, N, V).
        targets: (B, N) the student's sampled codes.
        mask: (B, N) bool, masked positions (where the loss applies).
        label_smoothing: cross-entropy label smoothing.
        soft_targets: (B, N, V) student probabilities, needed when ``soft_weight > 0``.
        soft_weight: a; the soft term is KL(p_S || softmax(aux / T)) * T^2 per token, summed over the vocabulary
            (the official code averages over it, which scales it by 1/V).
        soft_temperature: T.
        row_weight: optional (B,) bool of rows to keep (non-finite rows dropped).

    Returns:
        Scalar loss.
    """
    keep = mask.bool()
    if row_weight is not None:
        keep = keep & row_weight.bool()[:, None]
    count = keep.sum().clamp_min(1)
    logits = torch.where(keep[..., None], aux_logits.float(), torch.zeros_like(aux_logits, dtype=torch.float32))
    loss = aux_logits.new_zeros((), dtype=torch.float32)
    if soft_weight < 1.0:
        flat_targets = targets.reshape(-1).masked_fill(~keep.reshape(-1), -100)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), flat_targets, ignore_index=-100,
            label_smoothing=label_smoothing, reduction="sum",
        )
        loss = loss + (1.0 - soft_weight) * ce / count
    if soft_weight > 0.0:
        if soft_targets is None:
            raise ValueError("soft_targets are required when soft_weight > 0")
        log_q = F.log_softmax(logits / soft_temperature, dim=-1)
        p = torch.nan_to_num(soft_targets.float(), nan=0.0)
        kl = (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(-1) * soft_temperature**2  # (B, N)
        loss = loss + soft_weight * torch.where(keep, kl, torch.zeros_like(kl)).sum() / count
    return loss
