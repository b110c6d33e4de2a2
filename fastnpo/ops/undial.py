"""UNDIAL's per-token loss (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models", arXiv 2402.10052) without full logits.

With the current model's logits l = hidden @ weight.T, the reference model's r = ref_hidden @
ref_weight.T and the label y, UNDIAL's target is the reference distribution with the label's
logit lowered by beta, detached: q = softmax(r - beta * onehot(y)). The loss of a row is the
cross-entropy toward it,

    loss = -sum_v q_v log softmax(l)_v = LSE(l) - sum_v q_v l_v,

a function of per-row sums over the vocabulary: LSE(l), the adjusted reference LSE(r - beta e_y)
and the q-weighted sum of the current logits: soft_target.py's cross-entropy toward a detached
target with target logits t = r - beta e_y, recomputed block by block in the backward. With q
detached, d loss / d l_v = p_v - q_v (p = softmax(l)); nothing flows to ref_hidden or ref_weight.
Never [tokens x vocab].
"""

import torch

from .checks import check_hidden_and_weight, check_labels, check_positive
from .soft_target import label_columns, soft_target_token_losses


class _AdjustedReference:
    """UNDIAL's target logits: the reference's logits of the same tokens, the label's lowered by beta."""

    def __init__(self, ref_rows: torch.Tensor, ref_weight: torch.Tensor, labels: torch.Tensor, beta: float):
        self.ref_rows, self.ref_weight, self.labels, self.beta = ref_rows.float(), ref_weight, labels, beta
        self.rows = torch.arange(labels.shape[0], device=labels.device)

    def __call__(self, logits: torch.Tensor, v0: int) -> torch.Tensor:
        ref = self.ref_rows @ self.ref_weight[v0 : v0 + logits.shape[1]].float().T
        inside, local = label_columns(self.labels, v0, ref.shape[1])
        ref[self.rows[inside], local[inside]] -= self.beta
        return ref


def undial_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 10.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """UNDIAL's loss per token, LSE(l) - sum_v q_v l_v with q = softmax(r - beta onehot(y)) detached.

    hidden [..., D] and weight [V, D]: the current model (l = hidden @ weight.T); ref_hidden
    (same shape as hidden) and ref_weight (same shape as weight): the reference model's final
    hidden states of the same tokens and its lm_head (r = ref_hidden @ ref_weight.T), constants;
    labels [...] aligned with hidden (no shift). Returns fp32 [...], exactly 0.0 where labels ==
    ignore_index; differentiable w.r.t. hidden and weight. beta > 0: how far the label's reference
    logit is lowered (open-unlearning's default 10). chunk_size: vocabulary columns per block
    (default: about 16 MiB of fp32 logits per block).
    """
    check_hidden_and_weight(hidden, weight)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape != hidden.shape:
        got = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden).__name__
        raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {got}")
    if not isinstance(ref_weight, torch.Tensor) or ref_weight.shape != weight.shape:
        got = tuple(ref_weight.shape) if isinstance(ref_weight, torch.Tensor) else type(ref_weight).__name__
        raise ValueError(f"ref_weight must have weight's shape {tuple(weight.shape)}, got {got}")
    for name, value in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        if value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    beta = check_positive("beta", beta)
    flat_ref = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    ref_weight = ref_weight.detach()
    return soft_target_token_losses(
        hidden,
        weight,
        labels,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        make_target=lambda kept, kept_labels: _AdjustedReference(
            flat_ref.index_select(0, kept), ref_weight, kept_labels, beta
        ),
    )
