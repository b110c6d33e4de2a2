"""Tile helpers shared by the forward and backward kernels.

The logits tile hidden[rows] @ weight[cols].T is recomputed in both passes; keeping its
code in one place guarantees the backward sees exactly the logits the forward saw.
"""

import os

import triton
import triton.language as tl

# The interpreter runs kernels on CPU tensors. It must be decided before any @triton.jit
# function is defined, so it is read once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def tile_dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST: the interpreter computes bf16/fp16 tl.dot wrongly, so operands are cast to fp32
    there. IEEE: fp32 inputs must not silently drop to TF32 (torch's fp32 matmul does not).
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def logits_tile(
    H, W, row_ids, rows_mask, cols, cols_mask,
    stride_hn, stride_hd, stride_wv, stride_wd, D,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden[row_ids] @ weight[cols].T (masked edges read 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = H + row_ids[:, None] * stride_hn
    w_cols = W + cols[None, :] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h_mask = rows_mask[:, None] & d_mask[None, :]
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=h_mask, other=0.0)
        # weight read directly as a [BLOCK_D, BLOCK_V] tile: no transpose in registers.
        w_mask = d_mask[:, None] & cols_mask[None, :]
        w = tl.load(w_cols + offs_d[:, None] * stride_wd, mask=w_mask, other=0.0)
        acc = tile_dot(h, w, acc, UPCAST, IEEE)
    return acc


def autotune_configs(candidates):
    """One config under the interpreter (its autotuner cannot run several), the list on GPU."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in candidates
    ]
