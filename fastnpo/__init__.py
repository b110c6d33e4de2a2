"""fastnpo: fast, memory-lean LLM unlearning.

Fused linear + log-softmax log-probs (no [tokens x vocab] logits), the NPO family of losses,
and the tools around them.
"""

from .losses import (
    dpo_from_logprobs,
    ga_from_logprobs,
    ga_loss,
    nll_from_logprobs,
    npo_from_logprobs,
    npo_loss,
    simnpo_from_logprobs,
)
from .ops import sequence_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "dpo_from_logprobs",
    "ga_from_logprobs",
    "ga_loss",
    "nll_from_logprobs",
    "npo_from_logprobs",
    "npo_loss",
    "sequence_logprobs",
    "simnpo_from_logprobs",
    "token_logprobs",
]
