"""U2A (Unlearning to Align): which negatives to unlearn, and how much, by bi-level optimisation."""

from .bilevel import *  # noqa: F403
from .bilevel import _plain_sequence_logprobs, main, run_u2a  # noqa: F401
