"""Cross-entropy toward a detached target distribution, vocabulary chunk by chunk, no full logits.

CE-U (ce_u.py) and UNDIAL (undial.py) are both this loss with a different target: with the
logits l = hidden @ weight.T and target logits t (a function of each vocabulary block, no
gradient), q = softmax(t) and the loss of a row is

    loss = -sum_v q_v log softmax(l)_v = LSE(l) - sum_v q_v l_v,

a function of per-row sums over the vocabulary: LSE(l), LSE(t) and the q-weighted sum of l. The
forward accumulates them block by block (online maxima, the weighted sum rescaled with t's
running maximum); the backward recomputes each block of l and t. With q detached,
d loss / d l_v = p_v - q_v (p = softmax(l)). Target logits may be -inf (a token with no mass).
Memory: a few [rows, chunk] fp32 blocks at a time and O(N) per-row statistics.
"""

from typing import Protocol

import torch

from .blocks import CHUNKED_BYTES, vocab_blocks


class TargetLogits(Protocol):
    def __call__(self, logits: torch.Tensor, v0: int) -> torch.Tensor:
        """fp32 [rows, block] target logits of vocabulary columns v0..., given the block's logits
        (which it must not modify)."""
        ...


def vocab_chunk(num_rows: int, vocab_size: int, chunk_size: int | None) -> int:
    """Vocabulary columns per block: chunk_size, else the width of ops/blocks.py's rule at the CPU
    budget. Every block takes every row (a TargetLogits sees whole rows), so past the rule's row
    split (16384 rows) a block outgrows the budget: the rule's floor of 256 columns stands."""
    if chunk_size is not None:
        return min(int(chunk_size), vocab_size)
    return vocab_blocks(num_rows, vocab_size, budget_bytes=CHUNKED_BYTES)[1]


def label_columns(labels: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose label falls in [v0, v0 + width), their local column)."""
    local = labels - v0
    inside = (local >= 0) & (local < width)
    return inside, local.clamp(0, width - 1)


def _forward_sums(hidden, weight, target: TargetLogits, chunk):
    """Per row: LSE(l), LSE(t) and sum_v softmax(t)_v l_v (all fp32 [N])."""
    n, vocab_size = hidden.shape[0], weight.shape[0]
    rows = hidden.float()
    max_cur = rows.new_full((n,), float("-inf"))
    sum_cur = rows.new_zeros(n)
    max_t = rows.new_full((n,), float("-inf"))
    sum_t = rows.new_zeros(n)
    weighted = rows.new_zeros(n)  # sum_v exp(t_v - max_t) * l_v
    for v0 in range(0, vocab_size, chunk):
        logits = rows @ weight[v0 : v0 + chunk].float().T
        t = target(logits, v0)
        new_max = torch.maximum(max_cur, logits.amax(dim=1))
        sum_cur = sum_cur * torch.exp(max_cur - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        max_cur = new_max
        new_max = torch.maximum(max_t, t.amax(dim=1))
        # exp(-inf - -inf) is NaN: a row that has seen no finite target logit yet keeps zero sums.
        scale = torch.where(torch.isfinite(max_t), torch.exp(max_t - new_max), 0.0)
        safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)
        e = torch.exp(t - safe_max[:, None])
        sum_t = sum_t * scale + e.sum(dim=1)
        weighted = weighted * scale + (e * logits).sum(dim=1)
        max_t = new_max
    return max_cur + torch.log(sum_cur), max_t + torch.log(sum_t), weighted / sum_t


class SoftTargetCrossEntropy(torch.autograd.Function):
    """Per-row loss of compact rows (no ignored rows): hidden [N, D], weight [V, D], a TargetLogits
    of those rows. Differentiable w.r.t. hidden and weight; the target is a constant."""

    @staticmethod
    def forward(ctx, hidden, weight, target: TargetLogits, chunk: int):
        lse, lse_target, mean_target = _forward_sums(hidden, weight, target, chunk)
        ctx.save_for_backward(hidden, weight, lse, lse_target)
        ctx.target, ctx.chunk = target, chunk
        return lse - mean_target

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, lse, lse_target = ctx.saved_tensors
        rows = hidden.float()
        grad = grad.float()
        dh = rows.new_zeros(rows.shape) if ctx.needs_input_grad[0] else None
        dw = rows.new_zeros(weight.shape) if ctx.needs_input_grad[1] else None
        for v0 in range(0, weight.shape[0], ctx.chunk):
            w = weight[v0 : v0 + ctx.chunk].float()
            logits = rows @ w.T
            t = ctx.target(logits, v0)
            dlogits = (torch.exp(logits - lse[:, None]) - torch.exp(t - lse_target[:, None])).mul_(grad[:, None])
            if dh is not None:
                dh.addmm_(dlogits, w)
            if dw is not None:
                dw[v0 : v0 + ctx.chunk].addmm_(dlogits.T, rows)
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None,
            None,
        )


def soft_target_token_losses(hidden, weight, labels, *, ignore_index: int, chunk_size, make_target) -> torch.Tensor:
    """The loss per token of hidden [..., D] / labels [...] (checked by the caller), 0.0 where
    labels == ignore_index. make_target(kept_row_ids, kept_labels) -> the TargetLogits of the
    kept rows. chunk_size: vocabulary columns per block (None: about 16 MiB of fp32 logits)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    flat_labels = labels.reshape(-1).long()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = (flat_labels != ignore_index).nonzero()[:, 0]
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    if keep.numel():
        chunk = vocab_chunk(keep.numel(), weight.shape[0], chunk_size)
        target = make_target(keep, flat_labels[keep])
        values = SoftTargetCrossEntropy.apply(flat_hidden.index_select(0, keep), weight, target, chunk)
        out = out.index_put((keep,), values)
    elif hidden.requires_grad or weight.requires_grad:
        # No target: zeros that still reach the graph (empty sums), so a backward through them runs.
        out = out + (flat_hidden[:0].sum() + weight[:0].sum()).float()
    return out.view(labels.shape)
