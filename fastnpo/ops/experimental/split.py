"""The split design (impl="split", EXPERIMENTAL: never measured on a GPU; ops/DESIGNS.md): the
Triton forward, then a backward that splits each vocabulary block's work between a Triton kernel
(the block's dlogits) and two library matmuls (cuBLAS on CUDA: dW and dH), so no atomics and dW
written once. One numerics contract (bf16 / fp16 operands, fp32 accumulation, dW written once in the
weight's dtype), two implementations:

Where Triton runs (CUDA tensors, or CPU under TRITON_INTERPRET=1): the split kernels.
  forward   the Triton forward kernel (kernels/logprobs_forward.py): 2NDV, no logits stored.
  backward  for each block of Vc vocabulary rows (an [n, Vc] buffer of <= SPLIT_BUFFER_BYTES, ~16k
            columns at n=8192 in bf16: a handful of blocks, three launches each):
              kernels/softmax_gradient.py   dlogits = g * (onehot - softmax), recomputed: 2 n D Vc
              dW[v0:v1] = dlogits^T @ rows  one matmul over all rows, written once:      2 n D Vc
              dH += dlogits @ W_block       fp32 accumulator [n, D]:                      2 n D Vc
            Rows are split into blocks only when n is so large that a block would be narrower than
            MIN_SPLIT_COLUMNS (dW_b then sums over row blocks in an fp32 [Vc, D] buffer).
  FLOPs: 2NDV forward, 6NDV backward (the recompute is the price of not keeping logits): 8NDV in
  all, 1.33x the 6NDV floor, every FLOP in a matmul-shaped kernel; the only elementwise traffic
  is the dlogits buffer (written once, read by the two matmuls: 3 x 2 bytes x N x V in bf16).
  Extra memory: the buffer, one compact copy of the kept rows, the fp32 dH.

Elsewhere (CPU without the interpreter): vocabulary blocks of torch ops (the "blocked" path, the
design this module held before the split kernels). For each block of Vb rows: logits = rows @ W_b^T
(fp32 result), its log-sum-exp merged into a running one and the target picked; the backward
recomputes the block's logits, dlogits = g * (onehot - softmax) in torch, then the same two gradient
matmuls. The same 8NDV, but ~20 small elementwise launches per block, which is why CUDA takes the
split kernels. What the blocked path measured on a GPU and why the split kernels replaced it:
benchmarks/README.md ("Second GPU window").

The matmuls' fp32-result contract is ops/matmuls.py's (matmul_mode, Matmuls).
"""

import torch

from ..blocks import MIN_COLUMNS, MIN_SPLIT_COLUMNS, SPLIT_BLOCK_BYTES, SPLIT_BUFFER_BYTES, vocab_blocks
from ..chunked import add_target_logits_, softmax_gradient_
from ..matmuls import Matmuls, triton_runs_on

# Module knobs (ops/blocks.py gives the reasons), read at call time so tests can shrink the blocks.
BLOCK_BYTES = SPLIT_BLOCK_BYTES
MIN_VOCAB_BLOCK = MIN_COLUMNS


def blocks(num_rows: int, vocab_size: int, block_bytes: int | None = None) -> tuple[int, int]:
    """(row block, vocabulary block) of the torch block loop: fp32 blocks of <= block_bytes
    (default BLOCK_BYTES), rows filling the budget when the vocabulary is narrower than a block."""
    return vocab_blocks(
        num_rows,
        vocab_size,
        budget_bytes=BLOCK_BYTES if block_bytes is None else block_bytes,
        min_columns=MIN_VOCAB_BLOCK,
        rows_fill_narrow_vocab=True,
        widen_split_blocks=False,
    )


def split_blocks(
    num_rows: int, vocab_size: int, element_bytes: int, multiple: int, budget: int | None = None
) -> tuple[int, int]:
    """(row block, vocabulary block) of the split design's dlogits buffer.

    row block x vocab block x element_bytes <= budget (default SPLIT_BUFFER_BYTES); every row in one
    block unless that leaves fewer than MIN_SPLIT_COLUMNS columns; the vocabulary in near-equal blocks
    whose width is a multiple of `multiple` (the kernel's widest column tile: no ragged tile but the
    vocabulary's last) unless one block holds it all.
    """
    return vocab_blocks(
        num_rows,
        vocab_size,
        budget_bytes=SPLIT_BUFFER_BYTES if budget is None else budget,
        element_bytes=element_bytes,
        min_columns=multiple,
        split_columns=MIN_SPLIT_COLUMNS,
        multiple=multiple,
        rows_fill_narrow_vocab=True,
        even=True,
    )


def split_kernels(device: torch.device):
    """The Triton pieces of the split design, or None where they cannot run (not triton_runs_on the
    device, or no triton installed)."""
    if not triton_runs_on(device):
        return None
    try:  # imported here: the package (and this backend's CPU path) works without triton
        from ...kernels.logprobs_forward import logprobs_forward
        from ...kernels.softmax_gradient import COLUMN_MULTIPLE, softmax_gradient
    except ImportError:
        return None
    return logprobs_forward, softmax_gradient, COLUMN_MULTIPLE


def split_forward(
    hidden: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit (fp32 [n]) of hidden[row_ids] @ weight.T."""
    kernels = split_kernels(hidden.device)
    if kernels is not None:
        return kernels[0](hidden, weight, row_ids, labels)
    return _blocked_forward(hidden, weight, row_ids, labels)


def _blocked_forward(
    hidden: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """split_forward without Triton: vocabulary blocks of torch ops."""
    n, vocab_size = row_ids.numel(), weight.shape[0]
    ops = Matmuls(hidden)
    rows = ops.operand(hidden.index_select(0, row_ids))
    lse = torch.full((n,), float("-inf"), device=hidden.device)
    target = torch.zeros(n, device=hidden.device)
    row_block, vocab_block = blocks(n, vocab_size)
    for v0 in range(0, vocab_size, vocab_block):
        w = ops.operand(weight[v0 : v0 + vocab_block])
        for r0 in range(0, n, row_block):
            r = slice(r0, r0 + row_block)
            logits = ops.mm(rows[r], w.T)
            add_target_logits_(target[r], logits, labels[r], v0)
            lse[r] = torch.logaddexp(lse[r], torch.logsumexp(logits, dim=1))
    return lse, target


def split_backward(
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
    """dH (fp32 [n, D], compact rows) and dW ([V, D] in the weight's dtype) of sum_i grad[i] * logp[i].

    Exact: filter_eps is accepted for the common signature (skipping a block here would save a
    matmul only when every row of it is below the threshold, which the row-wide blocks make rare).
    """
    del filter_eps
    kernels = split_kernels(hidden.device)
    if kernels is not None:
        _, kernel, multiple = kernels
        return kernel_backward(
            hidden,
            weight,
            row_ids,
            labels,
            lse,
            grad,
            compute_dh=compute_dh,
            compute_dw=compute_dw,
            kernel=kernel,
            multiple=multiple,
        )
    return _blocked_backward(hidden, weight, row_ids, labels, lse, grad, compute_dh=compute_dh, compute_dw=compute_dw)


def kernel_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    compute_dh: bool,
    compute_dw: bool,
    kernel,
    multiple: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """split_backward where Triton runs: per vocabulary block, `kernel` (kernels.softmax_gradient) writes
    dlogits in the compute dtype, then dW_b = dlogits^T @ rows (written once) and dH += dlogits @ W_b.
    `multiple`: the kernel's widest column tile (split_blocks)."""
    n = row_ids.numel()
    ops = Matmuls(hidden)
    rows = ops.operand(hidden.index_select(0, row_ids)) if compute_dw and n else None
    row_block, vocab_block = split_blocks(n, weight.shape[0], hidden.element_size(), multiple)
    # One buffer for every block; the last (narrower) block uses a column slice of it, which both
    # the kernel (row stride) and the matmuls (leading dimension) take without a copy.
    buffer = torch.empty(row_block, vocab_block, device=hidden.device, dtype=hidden.dtype) if n else None

    def dlogits_of(v0: int, w_block: torch.Tensor, w: torch.Tensor, r: slice) -> torch.Tensor:
        out = buffer[: row_ids[r].numel(), : w_block.shape[0]]
        return kernel(hidden, w_block, row_ids[r], labels[r], lse[r], grad[r], v0, out)

    blocking = (n, row_block, vocab_block)
    return _block_gradients(hidden, weight, rows, blocking, dlogits_of, ops, compute_dh, compute_dw)


def _blocked_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    compute_dh: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """split_backward without Triton: vocabulary blocks of torch ops (the logits recomputed in fp32)."""
    n = row_ids.numel()
    ops = Matmuls(hidden)
    rows = ops.operand(hidden.index_select(0, row_ids))
    neg_lse = -lse[:, None]

    def dlogits_of(v0: int, w_block: torch.Tensor, w: torch.Tensor, r: slice) -> torch.Tensor:
        return softmax_gradient_(ops.addmm(neg_lse[r], rows[r], w.T), grad[r], labels[r], v0)

    blocking = (n, *blocks(n, weight.shape[0]))
    return _block_gradients(hidden, weight, rows, blocking, dlogits_of, ops, compute_dh, compute_dw)


def _block_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    blocking: tuple[int, int, int],
    dlogits_of,
    ops: Matmuls,
    compute_dh: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradient matmuls both backward paths share. blocking: (kept rows n, row block, vocabulary
    block). For each (vocabulary block, row slice r), dlogits_of(v0, weight block, its matmul operand,
    r) gives the block's dlogits; then dH[r] += dlogits @ W_b (fp32) and dW_b = dlogits^T @ rows,
    written once in the weight's dtype when every row is in one block, else summed over the row
    blocks in fp32 first. rows: the kept rows as a matmul operand (read for dW only)."""
    n, row_block, vocab_block = blocking
    vocab_size, dim = weight.shape
    dh = torch.zeros(n, dim, device=hidden.device) if compute_dh else None
    # Every dW block is written below when there is a row; with none, dW is all zeros.
    dw = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if compute_dw else None
    if n == 0 or not (compute_dh or compute_dw):
        return dh, dw
    for v0 in range(0, vocab_size, vocab_block):
        w_block = weight[v0 : v0 + vocab_block]
        w = ops.operand(w_block)
        dw_block = None  # fp32, only when the rows do not fit one block (dW_b then sums over row blocks)
        for r0 in range(0, n, row_block):
            r = slice(r0, r0 + row_block)
            dlogits = ops.operand(dlogits_of(v0, w_block, w, r))
            if dh is not None:
                ops.accumulate(dh[r], dlogits, w)
            if dw is not None and row_block >= n:
                ops.mm_into(dw[v0 : v0 + vocab_block], dlogits.T, rows)
            elif dw is not None:
                if dw_block is None:
                    dw_block = torch.zeros(w_block.shape[0], dim, device=hidden.device)
                ops.accumulate(dw_block, dlogits.T, rows[r])
        if dw_block is not None:
            dw[v0 : v0 + vocab_block] = dw_block
    return dh, dw
