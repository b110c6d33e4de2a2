"""Public log-prob functions: per token and per sequence, straight from hidden states."""

import torch

from .autograd import token_logprobs_flat
from .checks import check_hidden_and_weight, check_labels

# Hugging Face's label for "no target here" (prompt, padding): the default everywhere in fastnpo.
IGNORE_INDEX = -100


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    filter_eps="auto",
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[labels] without materialising the logits.

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 final hidden states.
        weight: [V, D] lm_head weight, same dtype and device as hidden.
        labels: [...] int64, aligned with hidden (no shift: labels[i] is the token predicted
            from hidden[i]); entries equal to ignore_index are skipped.
        impl: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
            (vocabulary-chunked PyTorch), "naive" (full logits), "auto" (triton on CUDA,
            torch elsewhere).
        filter_eps: backward gradient filtering of the triton path: vocabulary tiles whose
            probabilities are all below it (and hold no target) are skipped. "auto" = 2**-12
            for bf16/fp16 and exact for fp32; None or 0 = exact.

    Returns:
        float32 [...]; exactly 0.0 where labels == ignore_index. Differentiable with respect
        to hidden and weight (either may have requires_grad=False).
    """
    check_hidden_and_weight(hidden, weight)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    flat = token_logprobs_flat(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1).long(),
        ignore_index,
        impl,
        filter_eps,
    )
    return flat.view(labels.shape)


def aligned_labels(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """Labels aligned with hidden: with shift, hidden[:, t] predicts labels[:, t + 1] and the
    last position predicts nothing."""
    labels = labels.long()
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    impl: str = "auto",
    filter_eps="auto",
) -> torch.Tensor:
    """Per-sequence log-probability of the target tokens.

    Args:
        hidden: [B, T, D] final hidden states.
        weight: [V, D] lm_head weight.
        labels: [B, T] in Hugging Face convention: the input ids with prompt and padding
            positions set to ignore_index. With shift=True, hidden[:, t] predicts labels[:, t+1].
        average: False returns the sum of the target tokens' log-probs (NPO's convention);
            True their mean (0.0 for a row with no target).
        impl, filter_eps: as in token_logprobs.

    Returns:
        float32 [B].
    """
    check_hidden_and_weight(hidden, weight, exact_dim=3)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    targets = aligned_labels(labels, shift, ignore_index)
    batch, length, dim = hidden.shape
    tokens = token_logprobs_flat(
        hidden.reshape(batch * length, dim), weight, targets.reshape(-1), ignore_index, impl, filter_eps
    ).view(batch, length)
    sums = tokens.sum(dim=1)
    if not average:
        return sums
    return sums / (targets != ignore_index).sum(dim=1).clamp(min=1)
