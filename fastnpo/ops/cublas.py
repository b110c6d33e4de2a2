"""Vocabulary-blocked matmuls through the framework (cuBLAS on CUDA): the atomic-free design.

The first GPU run (benchmarks/results/logprobs_cuda_h200.md) showed where time goes: the Triton
backward with exact gradients spends ~3-4x the 6NDV floor accumulating dW with fp32 atomics, while
a plain cuBLAS matmul runs at ~92% of the chip's rate. This design uses only library matmuls:

  forward   for each block of Vb vocabulary rows: logits = rows @ W_b^T (bf16 / fp16 operands, fp32
            output), its log-sum-exp merged into a running one, the target logit picked.
  backward  for each block: recompute the block's logits, dlogits = g * (onehot - softmax), then
            dH += dlogits @ W_b (fp32 accumulator [n, D]) and dW_b = dlogits^T @ rows over ALL rows
            in one matmul: each dW row is written once, in the weight's dtype, with no atomics and
            no fp32 [V, D] buffer.

FLOPs: 2NDV forward, 6NDV backward (the recompute is the price of not keeping logits): 8NDV in
all, 1.33x the 6NDV floor at the matmul rate, against which the elementwise work on each block
(exp, scale, cast) runs out of L2 when a block is small enough to stay there (BLOCK_BYTES).

Low-precision operands with an fp32 result need torch.mm(..., out_dtype=torch.float32) (CUDA);
where the running torch lacks it (and on CPU) the block is computed in fp32 from upcast
operands: the same function, slower. `matmul_mode` says which one a device gets.
"""

from functools import cache

import torch

from .chunked import add_target_logits_, softmax_gradient_

BLOCK_BYTES = 32 * 2**20  # one fp32 [rows, Vb] logits block: fits the H100 / H200 L2 (50 / 60 MB)
MIN_VOCAB_BLOCK = 256  # narrower blocks make the matmuls inefficient; more rows are split instead


def blocks(num_rows: int, vocab_size: int, block_bytes: int = BLOCK_BYTES) -> tuple[int, int]:
    """(row block, vocabulary block) with row block x vocab block x 4 bytes <= block_bytes."""
    elements = max(block_bytes // 4, MIN_VOCAB_BLOCK)
    vocab_block = min(vocab_size, max(MIN_VOCAB_BLOCK, elements // max(num_rows, 1)))
    row_block = max(1, min(num_rows, elements // vocab_block))
    return row_block, vocab_block


@cache
def matmul_mode(device_type: str, dtype: torch.dtype) -> str:
    """How fp32 results come from this device's matmuls, probed once on small tensors:
    "out_dtype_inplace": low-precision operands, fp32 output, accumulated in place (out=);
    "out_dtype": the same, but the accumulation makes a new tensor (one copy per block);
    "upcast": fp32 operands (CPU, fp32 inputs, or a torch without out_dtype)."""
    if dtype not in (torch.bfloat16, torch.float16) or device_type != "cuda":
        return "upcast"
    a = torch.randn(8, 16, device=device_type).to(dtype)
    b = torch.randn(16, 8, device=device_type).to(dtype)
    want = a.float() @ b.float() + 1
    for mode in ("out_dtype_inplace", "out_dtype"):
        acc = torch.ones(8, 8, device=device_type)
        try:
            if mode == "out_dtype_inplace":
                out = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                out = torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            continue
        if out.dtype == torch.float32 and torch.allclose(out, want, atol=1e-3, rtol=1e-3):
            return mode
    return "upcast"


class _Matmuls:
    """fp32-result matmuls for one call, in the mode the device supports."""

    def __init__(self, like: torch.Tensor):
        self.mode = matmul_mode(like.device.type, like.dtype)
        self.dtype = like.dtype if self.mode != "upcast" else torch.float32

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b in fp32."""
        return torch.mm(a, b) if self.mode == "upcast" else torch.mm(a, b, out_dtype=torch.float32)

    def addmm(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """bias + a @ b in fp32, a new tensor (bias broadcasts)."""
        if self.mode == "upcast":
            return torch.addmm(bias, a, b)
        return torch.addmm(bias, a, b, out_dtype=torch.float32)

    def accumulate(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """acc += a @ b, acc fp32."""
        if self.mode == "upcast":
            acc.addmm_(a, b)
        elif self.mode == "out_dtype_inplace":
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))

    def mm_into(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """out = a @ b, written once in out's dtype (fp32 accumulation inside the matmul)."""
        if out.dtype == self.dtype and out.is_contiguous():
            torch.mm(a, b, out=out)
        else:
            out.copy_(self.mm(a, b))


def cublas_forward(
    hidden: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit (fp32 [n]) of hidden[row_ids] @ weight.T."""
    n, vocab_size = row_ids.numel(), weight.shape[0]
    ops = _Matmuls(hidden)
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


def cublas_backward(
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
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    ops = _Matmuls(hidden)
    rows = ops.operand(hidden.index_select(0, row_ids))
    dh = torch.zeros(n, dim, device=hidden.device) if compute_dh else None
    # Every dW block is written below when there is a row; with none, dW is all zeros.
    dw = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if compute_dw else None
    neg_lse = -lse[:, None]
    row_block, vocab_block = blocks(n, vocab_size)
    for v0 in range(0, vocab_size, vocab_block):
        w = ops.operand(weight[v0 : v0 + vocab_block])
        dw_block = None  # fp32, only when the rows do not fit one block (dW_b then sums over row blocks)
        for r0 in range(0, n, row_block):
            r = slice(r0, r0 + row_block)
            dlogits = softmax_gradient_(ops.addmm(neg_lse[r], rows[r], w.T), grad[r], labels[r], v0)
            dlogits = ops.operand(dlogits)
            if dh is not None:
                ops.accumulate(dh[r], dlogits, w)
            if dw is not None and row_block == n:
                ops.mm_into(dw[v0 : v0 + vocab_block], dlogits.T, rows)
            elif dw is not None:
                if dw_block is None:
                    dw_block = torch.zeros(w.shape[0], dim, device=hidden.device)
                ops.accumulate(dw_block, dlogits.T, rows[r])
        if dw_block is not None:
            dw[v0 : v0 + vocab_block] = dw_block
    return dh, dw
