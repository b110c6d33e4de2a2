"""Forward-only kernel: per row, the statistics of the next-token distribution in one vocabulary sweep.

Each program owns BLOCK_N rows and one of `num_splits` contiguous slices of the vocabulary (one slice:
one program per row block over the whole vocabulary). It walks its slice tile by tile (tiles of
hidden @ weight.T from tl.dot, as the log-prob forward) and keeps, per row, online:
    m  the running max logit, and the first column attaining it (argmax, ties to the smallest index)
    S = sum e^u, A = sum e^u u, B = sum e^u u^2 with u = logit - m, rescaled whenever m grows
    the target logit, picked up when the tile holds the label.
Only [num_splits, N] partials leave the kernel; the launcher folds the slices with the same rescaling.
See fastnpo/ops/statistics.py for the formulas.
"""

import torch
import triton
import triton.language as tl

from .logprobs_forward import default_num_splits
from .tiles import INTERPRET, ieee_dots, logits_tile

# One config (no autotuning yet): (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages).
GPU_CONFIG = (64, 128, 64, 8, 3)
INTERPRETER_CONFIG = (16, 32, 16, 4, 1)


@triton.jit(do_not_specialize=["N"])
def statistics_forward_kernel(
    H, W, ROW_IDS, LABELS, P_MAX, P_ARG, P_S, P_A, P_B, P_TARGET,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_mask = offs_n < N
    row_ids = tl.load(ROW_IDS + offs_n, mask=rows_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=rows_mask, other=-1).to(tl.int64)

    num_tiles = tl.cdiv(V, BLOCK_V)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)

    # An empty slice leaves max = -inf, S = 0: the launcher's fold ignores it.
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_N,), dtype=tl.int64)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        cols_mask = cols < V
        logits = logits_tile(
            H, W, row_ids, rows_mask, cols, cols_mask,
            stride_hn, stride_hd, stride_wv, stride_wd, D,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE,
        )
        logits = tl.where(cols_mask[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        # First column attaining the tile's max; the earlier tile keeps the argmax on a tie.
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], cols[None, :], V), axis=1)
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)
        new_max = tl.maximum(run_max, tile_max)
        delta = tl.where(s > 0, run_max - new_max, 0.0)
        scale = tl.exp(delta)
        b = scale * (b + 2.0 * delta * a + delta * delta * s)
        a = scale * (a + delta * s)
        s = scale * s
        run_max = new_max
        u = tl.where(cols_mask[None, :], logits - new_max[:, None], 0.0)
        e = tl.where(cols_mask[None, :], tl.exp(u), 0.0)
        eu = e * u
        s += tl.sum(e, axis=1)
        a += tl.sum(eu, axis=1)
        b += tl.sum(eu * u, axis=1)
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)

    out = split.to(tl.int64) * N + offs_n
    tl.store(P_MAX + out, run_max, mask=rows_mask)
    tl.store(P_ARG + out, run_arg, mask=rows_mask)
    tl.store(P_S + out, s, mask=rows_mask)
    tl.store(P_A + out, a, mask=rows_mask)
    tl.store(P_B + out, b, mask=rows_mask)
    tl.store(P_TARGET + out, target, mask=rows_mask)


def fold_splits(p_max, p_arg, p_s, p_a, p_b, p_target):
    """Fold [splits, n] partials (slices in vocabulary order) into (lse, target, mean, second, variance,
    argmax) [n]."""
    top = p_max.max(dim=0).values
    # Slices that saw nothing (S = 0, max = -inf) get delta 0 and contribute 0.
    delta = torch.where(p_s > 0, p_max - top, torch.zeros_like(p_max))
    scale = torch.exp(delta)
    s = (scale * p_s).sum(0)
    a = (scale * (p_a + delta * p_s)).sum(0)
    b = (scale * (p_b + 2.0 * delta * p_a + delta * delta * p_s)).sum(0)
    # The first slice (smallest columns) whose max is the overall max holds the argmax.
    first = ((p_max == top) & (p_s > 0)).int().argmax(dim=0)
    arg = p_arg.gather(0, first[None])[0]
    log_s = torch.log(s)
    mean_u, mean_u2 = a / s, b / s
    mean = mean_u - log_s
    second = mean_u2 - 2.0 * log_s * mean_u + log_s * log_s
    variance = (mean_u2 - mean_u * mean_u).clamp(min=0.0)
    return top + log_s, p_target.sum(0), mean, second, variance, arg


def statistics_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """(lse, target logit, mean, second moment, variance) fp32 [n] and argmax int64 [n] of
    hidden[row_ids] @ weight.T.

    hidden [N_all, D], weight [V, D] (same dtype, any strides), row_ids int64 [n], labels int64 [n]
    in [0, V). num_splits: vocabulary slices (default: enough programs to fill the GPU; 2 or 1 on CPU).
    """
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    device = hidden.device
    if n == 0:
        empty = torch.empty(0, device=device, dtype=torch.float32)
        floats = (empty, *(empty.clone() for _ in range(4)))
        return (*floats, torch.empty(0, device=device, dtype=torch.long))
    block_n, block_v, block_d, warps, stages = INTERPRETER_CONFIG if INTERPRET else GPU_CONFIG
    if num_splits is None:
        num_splits = default_num_splits(n, vocab_size, device, block_n, block_v)
    p_max = torch.empty(num_splits, n, device=device, dtype=torch.float32)
    p_s, p_a, p_b, p_target = (torch.empty_like(p_max) for _ in range(4))
    p_arg = torch.empty(num_splits, n, device=device, dtype=torch.long)
    grid = (triton.cdiv(n, block_n), num_splits)
    statistics_forward_kernel[grid](
        hidden, weight, row_ids, labels, p_max, p_arg, p_s, p_a, p_b, p_target,
        n, vocab_size, dim,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        UPCAST=INTERPRET and hidden.dtype != torch.float32,
        IEEE=ieee_dots(hidden.dtype),
        num_warps=warps, num_stages=stages,
    )
    return fold_splits(p_max, p_arg, p_s, p_a, p_b, p_target)
