"""UNDIAL's per-token loss (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models", arXiv 2402.10052) without full logits.

With the current model's logits l = hidden @ weight.T, the reference model's r = ref_hidden @
ref_weight.T and the label y, UNDIAL's target is the reference distribution with the label's
logit lowered by beta, detached: q = softmax(r - beta * onehot(y)). The loss of a row is the
cross-entropy toward it,

    loss = -sum_v q_v log softmax(l)_v = LSE(l) - sum_v q_v l_v,

a function of per-row sums over the vocabulary: LSE(l), the adjusted reference LSE(r - beta e_y)
and the q-weighted sum of the current logits. The forward accumulates them vocabulary chunk by
chunk (online maxima, the weighted sum rescaled with the reference's running maximum); the
backward recomputes each chunk of both logit blocks. With q detached, d loss / d l_v = p_v - q_v
(p = softmax(l)); nothing flows to ref_hidden or ref_weight. Memory: two [rows, chunk] fp32
blocks at a time and O(N) per-row statistics; never [tokens x vocab].
"""

import torch

from .ce_u import _label_mask, _vocab_chunk
from .checks import check_hidden_and_weight, check_labels, check_positive


def _forward_sums(hidden, weight, ref_hidden, ref_weight, labels, beta, chunk):
    """Per row: LSE(l), LSE(r - beta e_y) and sum_v q_v l_v (all fp32 [N])."""
    n, vocab_size = hidden.shape[0], weight.shape[0]
    rows, ref_rows = hidden.float(), ref_hidden.float()
    max_cur = rows.new_full((n,), float("-inf"))
    sum_cur = rows.new_zeros(n)
    max_ref = rows.new_full((n,), float("-inf"))
    sum_ref = rows.new_zeros(n)
    weighted = rows.new_zeros(n)  # sum_v exp(r_v - max_ref) * l_v
    arange = torch.arange(n, device=hidden.device)
    for v0 in range(0, vocab_size, chunk):
        logits = rows @ weight[v0 : v0 + chunk].float().T
        ref = ref_rows @ ref_weight[v0 : v0 + chunk].float().T
        inside, local = _label_mask(labels, v0, ref.shape[1])
        ref[arange[inside], local[inside]] -= beta
        new_max = torch.maximum(max_cur, logits.amax(dim=1))
        sum_cur = sum_cur * torch.exp(max_cur - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        max_cur = new_max
        new_max = torch.maximum(max_ref, ref.amax(dim=1))
        scale = torch.exp(max_ref - new_max)  # exp(-inf) = 0 on the first chunk: finite logits only
        e = torch.exp(ref - new_max[:, None])
        sum_ref = sum_ref * scale + e.sum(dim=1)
        weighted = weighted * scale + (e * logits).sum(dim=1)
        max_ref = new_max
    return max_cur + torch.log(sum_cur), max_ref + torch.log(sum_ref), weighted / sum_ref


class UndialFunction(torch.autograd.Function):
    """Per-row UNDIAL loss of compact rows (no ignored rows): hidden and ref_hidden [N, D], weight
    and ref_weight [V, D], labels [N]. Differentiable w.r.t. hidden and weight only."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, labels, beta, chunk):
        lse_cur, lse_ref, mean_q = _forward_sums(hidden, weight, ref_hidden, ref_weight, labels, beta, chunk)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, labels, lse_cur, lse_ref)
        ctx.beta, ctx.chunk = beta, chunk
        return lse_cur - mean_q

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, ref_hidden, ref_weight, labels, lse_cur, lse_ref = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab_size = hidden.shape[0], weight.shape[0]
        rows, ref_rows = hidden.float(), ref_hidden.float()
        grad = grad.float()
        dh = rows.new_zeros(rows.shape) if need_h else None
        dw = rows.new_zeros(weight.shape) if need_w else None
        arange = torch.arange(n, device=hidden.device)
        for v0 in range(0, vocab_size, ctx.chunk):
            w = weight[v0 : v0 + ctx.chunk].float()
            logits = rows @ w.T
            ref = ref_rows @ ref_weight[v0 : v0 + ctx.chunk].float().T
            inside, local = _label_mask(labels, v0, ref.shape[1])
            ref[arange[inside], local[inside]] -= ctx.beta
            dlogits = (torch.exp(logits - lse_cur[:, None]) - torch.exp(ref - lse_ref[:, None])).mul_(grad[:, None])
            if dh is not None:
                dh.addmm_(dlogits, w)
            if dw is not None:
                dw[v0 : v0 + ctx.chunk].addmm_(dlogits.T, rows)
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None,
            None,
            None,
            None,
            None,
        )


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
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    flat_labels = labels.reshape(-1).long()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = (flat_labels != ignore_index).nonzero()[:, 0]
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    if keep.numel():
        chunk = _vocab_chunk(keep.numel(), weight.shape[0], chunk_size)
        flat_ref = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).index_select(0, keep)
        values = UndialFunction.apply(
            flat_hidden.index_select(0, keep), weight, flat_ref, ref_weight.detach(), flat_labels[keep], beta, chunk
        )
        out = out.index_put((keep,), values)
    elif hidden.requires_grad or weight.requires_grad:
        # No target: zeros that still reach the graph (empty sums), so a backward through them runs.
        out = out + (flat_hidden[:0].sum() + weight[:0].sum()).float()
    return out.view(labels.shape)
