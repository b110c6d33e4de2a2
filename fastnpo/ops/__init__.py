"""The fused linear + log-softmax log-prob op: hidden states and the lm_head weight in,
per-token / per-sequence log-probabilities out, without the [tokens x vocab] logits.

    backends.py  the implementations (Triton kernels, vocabulary-chunked PyTorch) and the choice
    autograd.py  the autograd functions (two-pass, and the fused loss that does both in one call)
    one_pass.py  the fused loss's one-pass design: chunks of whole sequences, 6NDV (separable losses)
    chunked.py   the vocabulary-chunked PyTorch backend (fp32: the CPU path)
    cublas.py    gradients from library matmuls, fed by Triton kernels where they run (no atomics, exact dW)
    naive.py     full logits: the correctness reference and benchmark baseline
    checks.py    input checks that name the argument
    logprobs.py  the public token_logprobs / sequence_logprobs
    packed.py    per-example log-probs of packed rows
    statistics.py  per-token log p(label), mean / second moment of log p, argmax (forward only, no logits)
    ce_u.py      CE-U's per-token loss (vocabulary-chunked autograd function, no full logits)
    undial.py    UNDIAL's per-token loss toward the adjusted reference distribution (same scheme)
"""

from .autograd import check_fused, example_loss, fused_sequence_loss, token_logprobs_flat
from .backends import IMPLS, resolve_filter_eps, resolve_impl
from .ce_u import ce_u_token_losses
from .logprobs import IGNORE_INDEX, aligned_labels, sequence_logprobs, token_logprobs
from .naive import naive_token_logprobs
from .packed import packed_sequence_logprobs
from .statistics import TokenStatistics, token_statistics
from .undial import undial_token_losses

__all__ = [
    "IGNORE_INDEX",
    "IMPLS",
    "TokenStatistics",
    "aligned_labels",
    "ce_u_token_losses",
    "check_fused",
    "example_loss",
    "fused_sequence_loss",
    "naive_token_logprobs",
    "packed_sequence_logprobs",
    "resolve_filter_eps",
    "resolve_impl",
    "sequence_logprobs",
    "token_logprobs",
    "token_logprobs_flat",
    "token_statistics",
    "undial_token_losses",
]
