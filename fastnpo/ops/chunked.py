"""Vocabulary-chunked PyTorch implementation: the same math as the Triton kernels, no full logits.

Works on any device; it is the CPU path. Logits exist one [rows, chunk] block at a time, in
fp32; the backward recomputes each block from hidden and weight, as the kernels do.
Memory beyond inputs and gradients: O(CHUNK_ELEMENTS) + O(N * D) fp32 for dH.
Block sizes: ops/blocks.py's rule at its CPU budget, CHUNKED_BYTES.
"""

import torch

from .blocks import CHUNKED_BYTES, MIN_COLUMNS, vocab_blocks

# Read at call time, so tests can shrink the blocks; train/memory_estimate.py reads CHUNK_ELEMENTS.
CHUNK_ELEMENTS = CHUNKED_BYTES // 4
MIN_VOCAB_CHUNK = MIN_COLUMNS


def blocks(num_rows: int, vocab_size: int) -> tuple[int, int]:
    """(row block, vocabulary block) of this path's loops."""
    return vocab_blocks(num_rows, vocab_size, budget_bytes=4 * CHUNK_ELEMENTS, min_columns=MIN_VOCAB_CHUNK)


def add_target_logits_(target: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, v0: int) -> None:
    """target += the logit of each row's label where it falls in this block (columns v0...)."""
    local = labels - v0
    inside = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    target += torch.where(inside, picked, 0.0)


def softmax_gradient_(shifted: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, v0: int) -> torch.Tensor:
    """dlogits = grad * (onehot(label) - exp(logits - lse)) of a block, in place in `shifted`
    (= logits - lse, fp32 [rows, block]; columns v0...).

    The onehot is a mask-based scatter: every row adds grad where its label falls in this block and
    0 (at a clamped column) where it does not, so no host sync (nonzero / item) happens per block."""
    dlogits = shifted.exp_().mul_(-grad[:, None])
    local = labels - v0
    inside = (local >= 0) & (local < dlogits.shape[1])
    columns = local.clamp(0, dlogits.shape[1] - 1)[:, None]
    dlogits.scatter_add_(1, columns, torch.where(inside, grad, 0.0)[:, None].to(dlogits.dtype))
    return dlogits


def chunked_forward(
    hidden: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit (fp32 [N]) of hidden[row_ids] @ weight.T; see kernels.logprobs_forward."""
    n, vocab_size = row_ids.numel(), weight.shape[0]
    rows = hidden.index_select(0, row_ids).float()
    running_max = rows.new_full((n,), float("-inf"))
    running_sum = rows.new_zeros(n)
    target = rows.new_zeros(n)
    row_block, vocab_chunk = blocks(n, vocab_size)
    for v0 in range(0, vocab_size, vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk].float()
        for r0 in range(0, n, row_block):
            r = slice(r0, r0 + row_block)
            logits = rows[r] @ w.T
            add_target_logits_(target[r], logits, labels[r], v0)
            new_max = torch.maximum(running_max[r], logits.amax(dim=1))
            chunk_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            running_sum[r] = running_sum[r] * torch.exp(running_max[r] - new_max) + chunk_sum
            running_max[r] = new_max
    return running_max + torch.log(running_sum), target


def chunked_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    filter_eps: float,
    compute_dh: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 dH [N, D] (compact rows) and dW [V, D] of sum_n grad[n] * logp[n]; see kernels.logprobs_backward.

    filter_eps is accepted for a uniform signature; on CPU skipping blocks saves nothing
    worth its branch, so this path is always exact.
    """
    del filter_eps
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    rows = hidden.index_select(0, row_ids).float()
    dh = rows.new_zeros(n, dim) if compute_dh else None
    dw = rows.new_zeros(vocab_size, dim) if compute_dw else None
    neg_lse = -lse[:, None]
    row_block, vocab_chunk = blocks(n, vocab_size)
    for v0 in range(0, vocab_size, vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk].float()
        for r0 in range(0, n, row_block):
            r = slice(r0, r0 + row_block)
            dlogits = softmax_gradient_(torch.addmm(neg_lse[r], rows[r], w.T), grad[r], labels[r], v0)
            if dh is not None:
                dh[r].addmm_(dlogits, w)
            if dw is not None:
                dw[v0 : v0 + vocab_chunk].addmm_(dlogits.T, rows[r])
    return dh, dw
