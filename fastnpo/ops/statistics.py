"""Per-token statistics of the model's next-token distribution, from hidden states and the lm_head,
in one forward sweep over the vocabulary and without the [tokens x vocab] logits.

For each kept position with logits z = hidden @ weight.T and p = softmax(z):

    logprob        log p[label]
    mean           sum_v p_v log p_v            (minus the entropy)
    second_moment  sum_v p_v (log p_v)^2
    is_argmax      label == argmax_v z_v, ties broken toward the smallest index (torch.argmax's rule:
                   the label counts only if no smaller index has a logit equal to the maximum)

What the membership-inference attacks (Min-K%++ needs mean and variance = second_moment - mean^2),
exact memorization and extraction strength (is_argmax) need, as open-unlearning computes them from
full logits (docs/evaluation.md).

Streaming form (the chunked path and kernels/statistics_forward.py): with m the running max, u = z - m,
the sums S = sum e^u, A = sum e^u u, B = sum e^u u^2 are rescaled when m grows by d = m_old - m_new:
S <- e^d S, A <- e^d (A + d S), B <- e^d (B + 2 d A + d^2 S). At the end, with L = log S:
mean = A/S - L and second_moment = B/S + 2 L (-A/S) + L^2 (three non-negative terms: no cancellation);
variance = B/S - (A/S)^2, centred on the max logit, which keeps more digits than second_moment - mean^2
when the distribution is flat (|mean| ~ log V, variance small).

Forward only: the outputs carry no gradient.
"""

from typing import NamedTuple

import torch

from .backends import resolve_impl
from .blocks import STATISTICS_BYTES, vocab_blocks
from .checks import check_hidden_and_weight, check_labels
from .logprobs import IGNORE_INDEX, aligned_labels

STATISTICS_IMPLS = ("auto", "triton", "torch", "naive")
# fp32 elements of one logits block on the chunked path; read at call time, so tests can shrink it.
CHUNK_ELEMENTS = STATISTICS_BYTES // 4


class TokenStatistics(NamedTuple):
    """Per-position statistics, each shaped like the labels; 0.0 / False where labels == ignore_index."""

    logprob: torch.Tensor  # fp32: log p(label)
    mean: torch.Tensor  # fp32: sum_v p_v log p_v
    second_moment: torch.Tensor  # fp32: sum_v p_v (log p_v)^2
    is_argmax: torch.Tensor  # bool: the label is the (first) argmax of the logits
    variance: torch.Tensor  # fp32: second_moment - mean^2, computed stably (>= 0)


def rescale_sums(s, a, b, delta):
    """(S, A, B) of u = z - m_old re-expressed for u = z - m_new, delta = m_old - m_new <= 0.
    A sum still empty (S = 0, m_old = -inf) stays 0."""
    delta = torch.where(s > 0, delta, torch.zeros_like(delta))
    scale = torch.exp(delta)
    new_b = scale * (b + 2.0 * delta * a + delta * delta * s)
    new_a = scale * (a + delta * s)
    return scale * s, new_a, new_b


def finish_sums(s, a, b):
    """(mean, second_moment, variance) of log p from the sums S, A, B (see the module docstring)."""
    log_s = torch.log(s)
    mean_u, mean_u2 = a / s, b / s
    variance = (mean_u2 - mean_u * mean_u).clamp(min=0.0)
    return mean_u - log_s, mean_u2 - 2.0 * log_s * mean_u + log_s * log_s, variance


def chunked_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """(lse, target logit, mean, second moment, variance, argmax index) fp32/int64 [n] of hidden[row_ids] @ weight.T,
    in vocabulary blocks of fp32 logits (rows x chunk <= chunk_elements, default CHUNK_ELEMENTS)."""
    n, vocab_size = row_ids.numel(), weight.shape[0]
    rows = hidden.index_select(0, row_ids).float()
    run_max = rows.new_full((n,), float("-inf"))
    s, a, b, target = (rows.new_zeros(n) for _ in range(4))
    arg = torch.zeros(n, dtype=torch.long, device=rows.device)
    budget_bytes = 4 * (chunk_elements or CHUNK_ELEMENTS)
    row_block, vocab_chunk = vocab_blocks(n, vocab_size, budget_bytes=budget_bytes)
    # The logits block and its exp live in two buffers reused by every block: no allocation (and, for
    # large blocks, no fresh pages to fault in) per block.
    buffers = rows.new_empty(2, row_block * vocab_chunk)
    for v0 in range(0, vocab_size, vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk].float()
        for r0 in range(0, n, row_block):
            r = slice(r0, r0 + row_block)
            shape = (min(row_block, n - r0), w.shape[0])
            z = torch.mm(rows[r], w.T, out=buffers[0, : shape[0] * shape[1]].view(shape))
            local = labels[r] - v0
            inside = (local >= 0) & (local < z.shape[1])
            picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
            target[r] += torch.where(inside, picked, 0.0)
            block_max, block_arg = z.max(dim=1)  # first maximal index, as torch.argmax
            new_max = torch.maximum(run_max[r], block_max)
            # Strictly greater: on a tie the earlier block (smaller index) keeps the argmax.
            arg[r] = torch.where(block_max > run_max[r], block_arg + v0, arg[r])
            s[r], a[r], b[r] = rescale_sums(s[r], a[r], b[r], run_max[r] - new_max)
            run_max[r] = new_max
            u = z.sub_(new_max[:, None])
            e = torch.exp(u, out=buffers[1, : z.numel()].view(shape))
            s[r] += e.sum(dim=1)
            e.mul_(u)
            a[r] += e.sum(dim=1)
            b[r] += e.mul_(u).sum(dim=1)
    mean, second, variance = finish_sums(s, a, b)
    return run_max + torch.log(s), target, mean, second, variance, arg


def naive_statistics(
    hidden: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The same six outputs from full fp32 logits (the benchmark baseline; memory O(n V))."""
    logits = (hidden.index_select(0, row_ids) @ weight.T).float()
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    lse = logits.logsumexp(dim=-1)
    target = logits.gather(1, labels[:, None])[:, 0]
    mean = (p * logp).sum(-1)
    variance = (p * (logp - mean[:, None]).square()).sum(-1)
    return lse, target, mean, (p * logp.square()).sum(-1), variance, logits.argmax(dim=-1)


def _triton_statistics(hidden, weight, row_ids, labels):
    try:
        from ..kernels.statistics_forward import statistics_forward
    except ImportError as error:  # triton missing (macOS, Windows) or broken
        raise RuntimeError(f"impl='triton' needs the triton package: {error}") from error
    return statistics_forward(hidden, weight, row_ids, labels)


def resolve_statistics_impl(impl: str, device: torch.device) -> str:
    if impl not in STATISTICS_IMPLS:
        raise ValueError(f"impl must be one of {STATISTICS_IMPLS}, got {impl!r}")
    return resolve_impl(impl, device) if impl != "naive" else impl


@torch.no_grad()
def token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = False,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
) -> TokenStatistics:
    """Per-token log p(label), mean and second moment of log p under p, and whether the label is the
    argmax, without materialising the logits (impl "torch" / "triton").

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 final hidden states ([B, T, D] with shift=True).
        weight: [V, D] lm_head weight, same dtype and device as hidden.
        labels: [...] int64. shift=False (default): aligned with hidden, labels[i] is the token
            predicted from hidden[i] (as token_logprobs). shift=True: Hugging Face convention, [B, T]
            input ids with ignored positions set to ignore_index; hidden[:, t] predicts labels[:, t+1]
            and the statistics are returned at the predicting position t (the last is ignored).
        impl: "triton" (kernels/statistics_forward.py; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
            (vocabulary-chunked fp32 PyTorch), "naive" (full logits), "auto" (triton on CUDA, torch
            elsewhere).

    Returns:
        TokenStatistics of tensors shaped like labels: fp32 logprob, mean, second_moment, variance and
        bool is_argmax; 0.0 / False where the (aligned) label is ignore_index. Logits are accumulated in
        fp32 from the inputs' dtype. Not differentiable.
    """
    check_hidden_and_weight(hidden, weight, exact_dim=3 if shift else None)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    name = resolve_statistics_impl(impl, hidden.device)
    targets = aligned_labels(labels, True, ignore_index) if shift else labels.long()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = targets.reshape(-1)
    row_ids = (flat_labels != ignore_index).nonzero()[:, 0]
    kept = flat_labels.index_select(0, row_ids)
    outputs = [torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device) for _ in range(4)]
    is_argmax = torch.zeros(flat_labels.shape, dtype=torch.bool, device=hidden.device)
    if row_ids.numel():
        compute = {"naive": naive_statistics, "torch": chunked_statistics, "triton": _triton_statistics}[name]
        lse, target, mean, second, variance, arg = compute(flat_hidden, weight, row_ids, kept)
        for out, value in zip(outputs, (target - lse, mean, second, variance), strict=True):
            out.index_copy_(0, row_ids, value.float())
        is_argmax.index_copy_(0, row_ids, arg == kept)
    shape = targets.shape
    logprob, mean, second, variance = (o.view(shape) for o in outputs)
    return TokenStatistics(logprob, mean, second, is_argmax.view(shape), variance)
