"""Softmax-gradient kernel: one vocabulary block of dlogits, for the backward of the split design
(impl="split", experimental: fastnpo/ops/experimental/split.py).

The fused backward kernel (logprobs_backward.py) does all three matmuls of a tile in one program
and adds dH / dW with fp32 atomics into fp32 buffers (what that costs on a GPU: benchmarks/README.md,
"Second GPU window"). The split design leaves the two gradient matmuls to the library: for a
block of Vc vocabulary columns this kernel only recomputes the logits and writes

    dlogits[i, j] = grad[i] * (onehot(labels[i] == v0 + j) - exp(logit[i, j] - lse[i]))

in the compute dtype into an [n, Vc] buffer (what the matmuls read: bf16 dlogits are what the
fused kernel feeds its own dots, too), after which dW[v0:v0+Vc] = dlogits.T @ rows and
dH += dlogits @ W_block are plain cuBLAS matmuls (fastnpo/ops/experimental/split.py). Cost: the logits'
2 n D Vc FLOPs, as in the forward, plus n Vc stores.
"""

import torch
import triton
import triton.language as tl

from .tiles import (
    AUTOTUNE_CACHE,
    INTERPRET,
    autotune_configs,
    gradient_tile,
    ieee_dots,
    logits_tile,
    operand_buffer_bytes,
    prune_by_shared_memory,
    row_bucket,
)

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) tried on GPU: the forward's matmul-shaped tiles
# (the work per tile is the forward's, less the reductions, plus one store).
SOFTMAX_GRADIENT_CANDIDATES = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
]
# The interpreter (one config, CPU tensors) costs per program iteration, nearly whatever the tile:
# larger tiles than tiles.autotune_configs' 16 x 32 x 16 keep impl="split" on CPU tests and the GPU
# suite's smoke run (which launch this kernel once per vocabulary block of every call) short.
SOFTMAX_GRADIENT_CONFIGS = (
    [triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    if INTERPRET
    else autotune_configs(SOFTMAX_GRADIENT_CANDIDATES)
)
# Vocabulary blocks whose width is a multiple of this leave no ragged column tile but the last one.
COLUMN_MULTIPLE = max(config.kwargs["BLOCK_V"] for config in SOFTMAX_GRADIENT_CONFIGS)


def softmax_gradient_shared_bytes(config, dtype_bytes: int) -> int:
    """The kernel's shared memory: the pipelined logits loop's operand buffers, or an output tile in the
    compute dtype if that were larger (a layout conversion for the store runs after the loop, when its
    buffers are dead, so the two never add up). Against triton 3.9 compiles at D=4096 it is exact on
    sm_90 and an upper bound on sm_80 (num_stages - 1 buffers); the compile tests check every config."""
    k = config.kwargs
    bn, bv = k["BLOCK_N"], k["BLOCK_V"]
    return max(operand_buffer_bytes(bn, bv, k["BLOCK_D"], config.num_stages, dtype_bytes), bn * bv * dtype_bytes)


@triton.autotune(
    configs=SOFTMAX_GRADIENT_CONFIGS,
    # Not the block width V: the last vocabulary block is narrower and would re-tune. Each trial
    # writes every element of OUT, so no restore is needed between trials.
    key=["D", "N_BUCKET", "UPCAST", "IEEE", "GROUP_N"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(softmax_gradient_shared_bytes)},
    **AUTOTUNE_CACHE,
)
# The row count changes every step and v0 every launch: not specialising on them keeps one
# compiled binary per config (see logprobs_forward_kernel).
@triton.jit(do_not_specialize=["N", "N_BUCKET", "v0"])
def softmax_gradient_kernel(
    H, W, ROW_IDS, LABELS, LSE, GRAD, OUT,
    N, V, D, N_BUCKET, v0,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # W is the block's first row (V = its width), so the grid's columns are the block's.
    offs_n, rows_mask, row_ids, labels, lse, g, cols, cols_mask = gradient_tile(
        ROW_IDS, LABELS, LSE, GRAD, N, V, BLOCK_N, BLOCK_V, GROUP_N,
    )

    # The same tile code as the forward: the probabilities are those of the logits it summed.
    logits = logits_tile(
        H, W, row_ids, rows_mask, cols, cols_mask,
        stride_hn, stride_hd, stride_wv, stride_wd, D,
        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE,
    )
    # Masked rows read lse = g = 0 and are not stored; real rows have lse >= every logit.
    is_target = (cols[None, :] + v0) == labels[:, None]
    dlogits = g[:, None] * (is_target.to(tl.float32) - tl.exp(logits - lse[:, None]))

    out = OUT + offs_n.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(out, dlogits.to(OUT.dtype.element_ty), mask=rows_mask[:, None] & cols_mask[None, :])


def softmax_gradient(
    hidden: torch.Tensor,
    weight_block: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    v0: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write out[i, j] = grad[i] * (onehot(labels[i] == v0 + j) - softmax(hidden[row_ids[i]] @ W.T)[v0 + j]).

    hidden [N_all, D]; weight_block [Vc, D] = weight[v0 : v0 + Vc] (any strides); row_ids, labels
    (int64, labels over the whole vocabulary), lse and grad (fp32) [n]; out [n, Vc] with unit column
    stride (a column slice of a wider buffer is fine), in the compute dtype. Returns out.
    """
    n, (width, dim) = row_ids.numel(), weight_block.shape
    assert out.shape == (n, width) and out.stride(1) == 1, "out must be [n, Vc] with unit column stride"
    if n == 0 or width == 0:
        return out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

    softmax_gradient_kernel[grid](
        hidden, weight_block, row_ids, labels, lse, grad, out,
        n, width, dim, row_bucket(n), int(v0),
        hidden.stride(0), hidden.stride(1), weight_block.stride(0), weight_block.stride(1), out.stride(0),
        GROUP_N=8,
        UPCAST=INTERPRET and hidden.dtype != torch.float32,
        IEEE=ieee_dots(hidden.dtype),
    )
    return out
