"""The fused linear + log-softmax log-prob op: hidden states and the lm_head weight in,
per-token / per-sequence log-probabilities out, without the [tokens x vocab] logits.

What is production and what is experimental, with where each design was measured and how fast:
DESIGNS.md (checked against README.md's `impl` paragraph by tests/test_design_status.py).

    backends.py  the `impl` backends (Triton kernels, vocabulary-chunked PyTorch, split) and the choice
    designs.py   the `design` names (two_call, two_sweep, one_pass, epilogue) and the deprecated `fused`
    autograd.py  the autograd functions (two calls, and the single-call loss designs)
    one_pass.py  design="one_pass": chunks of whole sequences in one sweep, 6NDV (separable losses)
    chunked.py   impl="torch": the vocabulary-chunked PyTorch backend (fp32: the CPU path)
    blocks.py    the block sizes of every vocabulary-chunked loop: one rule, a named budget per use
    matmuls.py   fp32-result library matmuls (one_pass, split) and where Triton runs
    naive.py     impl="naive": full logits, the correctness reference and benchmark baseline
    experimental/  designs never measured on a GPU and chosen by no default:
                 split.py (impl="split", formerly "cublas"), epilogue.py (design="epilogue")
    checks.py    input checks that name the argument
    logprobs.py  the public token_logprobs / sequence_logprobs
    packed.py    which example each position belongs to; per-example log-probs of packed rows
    statistics.py  per-token log p(label), mean / second moment of log p, argmax (forward only, no logits)
    ce_u.py      CE-U's per-token loss (vocabulary-chunked autograd function, no full logits)
    undial.py    UNDIAL's per-token loss toward the adjusted reference distribution (same scheme)
"""

from .autograd import example_loss, fused_sequence_loss, token_logprobs_flat
from .backends import IMPLS, resolve_filter_eps, resolve_impl
from .ce_u import ce_u_token_losses
from .designs import DESIGNS, resolve_design
from .logprobs import IGNORE_INDEX, aligned_labels, sequence_logprobs, token_logprobs
from .naive import naive_token_logprobs
from .packed import example_of_positions, packed_sequence_logprobs, target_owner
from .statistics import TokenStatistics, token_statistics
from .undial import undial_token_losses

__all__ = [
    "DESIGNS",
    "IGNORE_INDEX",
    "IMPLS",
    "TokenStatistics",
    "aligned_labels",
    "ce_u_token_losses",
    "example_loss",
    "example_of_positions",
    "fused_sequence_loss",
    "naive_token_logprobs",
    "packed_sequence_logprobs",
    "resolve_design",
    "resolve_filter_eps",
    "resolve_impl",
    "sequence_logprobs",
    "target_owner",
    "token_logprobs",
    "token_logprobs_flat",
    "token_statistics",
    "undial_token_losses",
]
