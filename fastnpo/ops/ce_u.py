"""CE-U's per-token loss (Cross-Entropy Unlearning, Yang 2025, arXiv 2503.01224) without full logits.

With logits l = hidden @ weight.T and the label y, CE-U's target is the model's own distribution
with the label's logit set to -inf, detached: q_v = softmax_{v != y}(l)_v, q_y = 0. The loss of a
row is the cross-entropy toward it,

    loss = -sum_v q_v log softmax(l)_v = LSE(l) - sum_{v != y} q_v l_v,

a function of per-row sums over the vocabulary: LSE(l), the log-sum-exp without the label and
the exp-weighted sum of the other logits. The forward accumulates them vocabulary chunk by chunk
(online max, as a log-sum-exp kernel does); the backward recomputes each chunk. With q detached,
d loss / d l_v = p_v - q_v for v != y and p_y for v = y (p = softmax(l)). Memory: one
[rows, chunk] fp32 block at a time and O(N) per-row statistics; never [tokens x vocab].
"""

import torch

from .checks import check_hidden_and_weight, check_labels

CHUNK_ELEMENTS = 1 << 22  # about 16 MiB of fp32 logits per block


def _vocab_chunk(num_rows: int, vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), vocab_size))
    return max(1, min(vocab_size, max(256, CHUNK_ELEMENTS // max(1, num_rows))))


def _label_mask(labels: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose label falls in [v0, v0 + width), their local column)."""
    local = labels - v0
    inside = (local >= 0) & (local < width)
    return inside, local.clamp(0, width - 1)


def _forward_sums(hidden, weight, labels, chunk):
    """Per row: LSE over all logits, LSE over the logits other than the label, and
    sum_{v != y} softmax_{v != y}(l)_v * l_v (all fp32 [N])."""
    n, vocab_size = hidden.shape[0], weight.shape[0]
    rows = hidden.float()
    max_all = rows.new_full((n,), float("-inf"))
    sum_all = rows.new_zeros(n)
    max_ex = rows.new_full((n,), float("-inf"))
    sum_ex = rows.new_zeros(n)
    weighted_ex = rows.new_zeros(n)  # sum_{v != y} exp(l_v - max_ex) * l_v
    arange = torch.arange(n, device=hidden.device)
    for v0 in range(0, vocab_size, chunk):
        logits = rows @ weight[v0 : v0 + chunk].float().T
        inside, local = _label_mask(labels, v0, logits.shape[1])
        new_max = torch.maximum(max_all, logits.amax(dim=1))
        sum_all = sum_all * torch.exp(max_all - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        max_all = new_max
        excluded = logits.clone()
        excluded[arange[inside], local[inside]] = float("-inf")
        new_max = torch.maximum(max_ex, excluded.amax(dim=1))
        # exp(-inf - -inf) is NaN: a row that has seen no finite logit yet keeps zero sums.
        scale = torch.where(torch.isfinite(max_ex), torch.exp(max_ex - new_max), 0.0)
        safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)
        e = torch.exp(excluded - safe_max[:, None])
        sum_ex = sum_ex * scale + e.sum(dim=1)
        weighted_ex = weighted_ex * scale + (e * logits).sum(dim=1)
        max_ex = new_max
    lse_all = max_all + torch.log(sum_all)
    lse_ex = max_ex + torch.log(sum_ex)
    return lse_all, lse_ex, weighted_ex / sum_ex


class CEUFunction(torch.autograd.Function):
    """Per-row CE-U loss of compact rows (no ignored rows): hidden [N, D], weight [V, D], labels [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        lse_all, lse_ex, mean_ex = _forward_sums(hidden, weight, labels, chunk)
        ctx.save_for_backward(hidden, weight, labels, lse_all, lse_ex)
        ctx.chunk = chunk
        return lse_all - mean_ex

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse_all, lse_ex = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab_size = hidden.shape[0], weight.shape[0]
        rows = hidden.float()
        grad = grad.float()
        dh = rows.new_zeros(rows.shape) if need_h else None
        dw = rows.new_zeros(weight.shape) if need_w else None
        arange = torch.arange(n, device=hidden.device)
        for v0 in range(0, vocab_size, ctx.chunk):
            w = weight[v0 : v0 + ctx.chunk].float()
            logits = rows @ w.T
            inside, local = _label_mask(labels, v0, logits.shape[1])
            p = torch.exp(logits - lse_all[:, None])
            q = torch.exp(logits - lse_ex[:, None])
            q[arange[inside], local[inside]] = 0.0  # the label has no mass in CE-U's target
            dlogits = (p - q).mul_(grad[:, None])
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


def ce_u_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CE-U's loss per token, LSE(l) - sum_{v != y} q_v l_v, q = softmax over v != y of l (detached).

    hidden [..., D], weight [V, D] (V >= 2), labels [...] aligned with hidden (no shift). Returns
    fp32 [...], exactly 0.0 where labels == ignore_index; differentiable w.r.t. hidden and weight.
    chunk_size: vocabulary columns per block (default: about 16 MiB of fp32 logits per block).
    """
    check_hidden_and_weight(hidden, weight)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have a vocabulary of at least 2 tokens for CE-U, got {weight.shape[0]}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    flat_labels = labels.reshape(-1).long()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = (flat_labels != ignore_index).nonzero()[:, 0]
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    if keep.numel():
        chunk = _vocab_chunk(keep.numel(), weight.shape[0], chunk_size)
        values = CEUFunction.apply(flat_hidden.index_select(0, keep), weight, flat_labels[keep], chunk)
        out = out.index_put((keep,), values)
    elif hidden.requires_grad or weight.requires_grad:
        # No target: zeros that still reach the graph (empty sums), so a backward through them runs.
        out = out + (flat_hidden[:0].sum() + weight[:0].sum()).float()
    return out.view(labels.shape)
