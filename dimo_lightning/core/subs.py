"""MDLM's SUBS parameterisation (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models", sec. 3.2).

The network's raw logits become the reverse-process posterior over clean tokens under two constraints:
zero masking probability (the clean sequence never contains the mask, so its logit is -inf before the softmax) and
carry-over unmasking (a position that is not masked in x_t is already clean: its distribution is a one-hot of the
current token). The released ``kuleshov-group/mdlm-owt`` model returns raw logits; SUBS is applied outside it.
"""

from __future__ import annotations

import torch


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Log-probabilities of the clean tokens under SUBS.

    The reference adds -1e6 to the mask logit; -inf gives the same probabilities (``exp(-1e6)`` is 0 in float32) and
    states the intent. Computed in float32 whatever the logits' dtype (the network runs under bf16 autocast on GPUs,
    and a bf16 log-softmax over 50k entries loses the tail).

    Args:
        logits: (B, L, V) raw network logits; V includes the mask id.
        input_ids: (B, L) the current noisy sequence x_t (mask id at masked positions).
        mask_id: the mask token's id, in [0, V).

    Returns:
        (B, L, V) float32 log-probabilities: at masked positions a log-softmax with the mask entry -inf (so the mask
        is never predicted); at unmasked positions 0 at the current token and -inf elsewhere. Gradients reach the
        logits of masked positions only.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, L, V) and input_ids (B, L); got {list(logits.shape)} and "
                         f"{list(input_ids.shape)}")
    vocab = logits.shape[-1]
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id must lie in [0, {vocab}) (the logit width), got {mask_id}")
    never_mask = torch.zeros(vocab, device=logits.device, dtype=torch.float32)
    never_mask[mask_id] = float("-inf")
    log_probs = (logits.float() + never_mask).log_softmax(dim=-1)  # (B, L, V)
    carry = torch.full_like(log_probs, float("-inf")).scatter_(-1, input_ids.unsqueeze(-1), 0.0)
    return torch.where((input_ids != mask_id).unsqueeze(-1), carry, log_probs)
