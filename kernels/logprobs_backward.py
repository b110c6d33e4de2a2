"""Backward kernel: dH and dW of per-row log-probs for a per-row upstream gradient g.

d logp_n / d logit_nv = onehot(v == label_n) - softmax_nv, so
    dlogits = g[:, None] * (onehot - exp(logits - lse[:, None]))
    dH[rows] += dlogits @ W[cols],   dW[cols] += dlogits.T @ H[rows].
Each program recomputes one [BLOCK_N, BLOCK_V] logits tile (nothing of size N x V is ever
stored) and adds its share of dH and dW into fp32 buffers with atomics. The atomics are relaxed:
nothing reads the sums before the kernel ends, and the default acq_rel turns every vector atomic
into MEMBAR + cache invalidation + ATOMG on sm_90 instead of a plain REDG.

Gradient filtering: a tile whose every probability is below `filter_eps` and that holds no
target contributes less than filter_eps * |g| * |W| per element; skipping its two matmuls
is where most of the backward time goes for peaked distributions. filter_eps <= 0 is exact.
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
    tile_dot,
)

BACKWARD_CANDIDATES = [
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 3),
    # sm_80 (A100): in bf16 the only one ptxas fits in registers without spilling (222 registers)
    (64, 64, 64, 8, 3),
]


def backward_shared_bytes(config, dtype_bytes: int) -> int:
    """An upper bound on the backward kernel's shared memory with this config.

    The pipelined logits loop (as in the forward) plus two fp32 [BLOCK_N, BLOCK_V] tiles for the
    probabilities / dlogits layout conversions. Against triton 3.9 compiles in bf16 (D=4096) it is exact
    for 64x256x64 on sm_90 (253,952 B: over the 232,448 B limit, so pruned) and above the others
    (sm_90: 106,496 / 163,840 / 106,496 / 81,920 B, the last exact; sm_80: 98,304 / 131,072 / 180,224 /
    98,304 / 57,344 B); the compile tests check that it bounds every compiled config. It is loose for
    128x128x64 on sm_80 (estimate 229,376 B, compiled 131,072 B), which the pruner therefore drops there.
    """
    k = config.kwargs
    bn, bv = k["BLOCK_N"], k["BLOCK_V"]
    return operand_buffer_bytes(bn, bv, k["BLOCK_D"], config.num_stages, dtype_bytes) + 2 * bn * bv * 4


@triton.autotune(
    configs=autotune_configs(BACKWARD_CANDIDATES),
    # Every constexpr that is not a config's changes the kernel's work: FILTER skips tiles, COMPUTE_DH /
    # COMPUTE_DW drop a matmul and its atomics, so the exact run must not inherit the filtered run's
    # config (tests/kernels/test_autotune_keys.py checks that none is missing).
    key=["V", "D", "N_BUCKET", "FILTER", "COMPUTE_DH", "COMPUTE_DW", "UPCAST", "IEEE", "GROUP_N"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(backward_shared_bytes)},
    # Autotuning runs the kernel several times; atomics must start from zero each time.
    reset_to_zero=["DH", "DW"],
    **AUTOTUNE_CACHE,
)
# The row count changes every step (dynamic padding, kept rows): not specialising on it (N % 16,
# N == 1) keeps one compiled binary per config instead of one per specialisation, so a new
# batch shape costs at most an autotune of N_BUCKET, never a recompile.
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def logprobs_backward_kernel(
    H, W, ROW_IDS, LABELS, LSE, GRAD, DH, DW,
    N, V, D, N_BUCKET,
    stride_hn, stride_hd, stride_wv, stride_wd,
    filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, FILTER: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    offs_n, rows_mask, row_ids, labels, lse, g, cols, cols_mask = gradient_tile(
        ROW_IDS, LABELS, LSE, GRAD, N, V, BLOCK_N, BLOCK_V, GROUP_N,
    )

    logits = logits_tile(
        H, W, row_ids, rows_mask, cols, cols_mask,
        stride_hn, stride_hd, stride_wv, stride_wd, D,
        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE,
    )
    live = rows_mask & (g != 0.0)
    valid = live[:, None] & cols_mask[None, :]
    probs = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
    is_target = (cols[None, :] == labels[:, None]) & valid

    if FILTER:
        largest = tl.max(tl.max(probs, axis=1), axis=0)
        targets_here = tl.sum(tl.sum(is_target.to(tl.int32), axis=1), axis=0)
        if (largest < filter_eps) & (targets_here == 0):
            return

    dlogits = g[:, None] * (is_target.to(tl.float32) - probs)
    dlogits = dlogits.to(H.dtype.element_ty)

    rows64 = offs_n.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if COMPUTE_DH:
            w = tl.load(
                W + cols[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                mask=cols_mask[:, None] & d_mask[None, :], other=0.0,
            )
            dh = tile_dot(dlogits, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), UPCAST, IEEE)
            tl.atomic_add(
                DH + rows64[:, None] * D + offs_d[None, :], dh,
                mask=rows_mask[:, None] & d_mask[None, :],
                sem="relaxed",
            )
        if COMPUTE_DW:
            h = tl.load(
                H + row_ids[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                mask=rows_mask[:, None] & d_mask[None, :], other=0.0,
            )
            dw = tile_dot(tl.trans(dlogits), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), UPCAST, IEEE)
            tl.atomic_add(
                DW + cols[:, None] * D + offs_d[None, :], dw,
                mask=cols_mask[:, None] & d_mask[None, :],
                sem="relaxed",
            )


def logprobs_backward(
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
    """fp32 gradients of sum_n grad[n] * logp[n]: dH [len(row_ids), D] (compact rows) and dW [V, D].

    Arguments as in logprobs_forward, plus lse (fp32 [N], from the forward) and grad (fp32 [N]).
    filter_eps <= 0 disables gradient filtering. A gradient not asked for is returned as None.
    """
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    dh = torch.zeros(n, dim, device=hidden.device, dtype=torch.float32) if compute_dh else None
    dw = torch.zeros(vocab_size, dim, device=hidden.device, dtype=torch.float32) if compute_dw else None
    if n == 0 or not (compute_dh or compute_dw):
        return dh, dw
    # A placeholder keeps the kernel signature fixed (the constexpr flags skip its use); it
    # must be its own buffer because the autotuner zeroes DH and DW between trials.
    placeholder = torch.zeros(1, device=hidden.device, dtype=torch.float32)
    dh_arg = dh if dh is not None else placeholder
    dw_arg = dw if dw is not None else placeholder

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vocab_size, meta["BLOCK_V"]),)

    logprobs_backward_kernel[grid](
        hidden, weight, row_ids, labels, lse, grad, dh_arg, dw_arg,
        n, vocab_size, dim, row_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(filter_eps),
        GROUP_N=8,
        UPCAST=INTERPRET and hidden.dtype != torch.float32,
        IEEE=ieee_dots(hidden.dtype),
        FILTER=filter_eps > 0,
        COMPUTE_DH=compute_dh,
        COMPUTE_DW=compute_dw,
    )
    return dh, dw
