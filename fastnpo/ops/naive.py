"""The naive implementation: full [N, V] logits, as a Hugging Face causal LM computes them.

The correctness reference for the fused paths and the baseline of the benchmarks.
"""

import torch


def naive_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """fp32 log softmax(hidden @ weight.T)[labels], 0.0 where labels == ignore_index.

    Logits are computed in the input dtype and upcast before the softmax, like transformers.
    """
    logits = (hidden @ weight.T).float()
    ignored = labels == ignore_index
    picked = logits.log_softmax(dim=-1).gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)
