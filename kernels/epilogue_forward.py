"""Fused-epilogue forward: the logits GEMM whose epilogue keeps per-(row, tile) softmax statistics.

The "epilogue" design (experimental: fastnpo/ops/experimental/epilogue.py; QuACK's scaled-exp idea adapted to
per-sequence losses). One program per (BLOCK_N rows, TILE_V vocabulary columns) output tile of
hidden[row_ids] @ weight.T, a full GEMM tile (tiles.logits_tile: fp32 accumulation over D). Its
epilogue, on the fp32 tile z still in registers:

    m[r, t]  = max_v z[r, v]                          the tile max            fp32 [n, T]
    s[r, t]  = sum_v exp(z[r, v] - m[r, t])           fp32 sum of the exps    fp32 [n, T]
    E[r, v]  = exp(z[r, v] - m[r, t])                 in (0, 1], stored in the operand dtype
                                                      (bf16 / fp16 / fp32) when STORE_E
    target[r] = z[r, labels[r]]                       exact fp32, stored by the one tile holding it

T = cdiv(V, TILE_V) tiles per row; the last one's columns past V are -inf (exp 0), so every tile
has a finite max. Nothing of size n x V is written when STORE_E is False (the forward-only form:
reference passes, evaluation). The log-sum-exp is a fold of the [n, T] partials
(lse = M + log sum_t s exp(m - M)), left to the caller (torch on tiny tensors). E's rounding is
relative (every entry is <= 1 before it), so softmax = E * exp(m - lse) carries one rounding of
the operand dtype, as bf16 dlogits would; the log-probs (target - lse) are exact fp32.

The backward (epilogue_backward.py) loads E with the per-(row, tile) scales; its K-steps over the
vocabulary divide TILE_V, so each step sees one scale per row.

Grid: 1-D, grouped: GROUP_N row tiles sweep the vocabulary tiles together, so a wave of programs
reads each W tile once from HBM and a few rows of H from L2. Offsets row * stride are int64.
"""

import torch
import triton
import triton.language as tl

from .tiles import (
    AUTOTUNE_CACHE,
    INTERPRET,
    ieee_dots,
    logits_tile,
    operand_buffer_bytes,
    prune_by_shared_memory,
    row_bucket,
)

# The partials' tile width: the forward's BLOCK_V, fixed (not tuned) because the [n, T] partials and
# the backward's scales are laid out by it. 128 on GPU (a wgmma-friendly N of the logits tile, and
# the dW kernel's M tile at most); 32 under the interpreter (tiny test vocabularies get several tiles).
TILE_V = 32 if INTERPRET else 128

# (BLOCK_N, BLOCK_D, GROUP_N, num_warps, num_stages) tried on GPU, BLOCK_V = TILE_V. Compiled for sm_90
# in bf16 at N=8192, D=4096, V=128256 (tests/kernels/test_kernel_compile.py): 230-238 registers, no
# spills; (128, 128, 8, 8, 3) was dropped: 255 registers and 8 bytes of spills with E stored.
EPILOGUE_FORWARD_CANDIDATES = [
    (128, 64, 8, 8, 3),
    (128, 64, 8, 8, 4),
    (64, 64, 8, 4, 4),
]


def epilogue_forward_configs():
    if INTERPRET:  # one config (the interpreter's autotuner cannot run several), small tiles
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 16, "GROUP_N": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "GROUP_N": g}, num_warps=w, num_stages=s)
        for bn, bd, g, w, s in EPILOGUE_FORWARD_CANDIDATES
    ]


EPILOGUE_FORWARD_CONFIGS = epilogue_forward_configs()


def epilogue_forward_shared_bytes(config, dtype_bytes: int) -> int:
    """The pipelined GEMM loop's operand buffers, or the E tile staged for its store if larger (the
    staging runs after the loop, when the operand buffers are dead); the compile tests check it."""
    k = config.kwargs
    loop = operand_buffer_bytes(k["BLOCK_N"], TILE_V, k["BLOCK_D"], config.num_stages, dtype_bytes)
    return max(loop, k["BLOCK_N"] * TILE_V * 4)


@triton.jit
def grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """(pid_a, pid_b) of a 1-D grid in grouped order: GROUP consecutive a-tiles sweep the b-tiles together."""
    per_group = GROUP * num_b
    first_a = (pid // per_group) * GROUP
    group_size = tl.minimum(num_a - first_a, GROUP)
    pid_a = first_a + (pid % per_group) % group_size
    pid_b = (pid % per_group) // group_size
    return pid_a, pid_b


@triton.autotune(
    configs=EPILOGUE_FORWARD_CONFIGS,
    # Every output is overwritten by each trial (TARGET by the one tile holding each label): no restore.
    key=["V", "D", "N_BUCKET", "TILE_V", "STORE_E", "UPCAST", "IEEE"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(epilogue_forward_shared_bytes)},
    **AUTOTUNE_CACHE,
)
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def epilogue_forward_kernel(
    H, W, ROW_IDS, LABELS, E, TILE_MAX, TILE_SUM, TARGET,
    N, V, D, N_BUCKET,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_en, stride_pn,
    TILE_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    STORE_E: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    num_t = tl.cdiv(V, TILE_V)
    pid_n, pid_t = grouped_tile(tl.program_id(0), num_n, num_t, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_mask = offs_n < N
    row_ids = tl.load(ROW_IDS + offs_n, mask=rows_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=rows_mask, other=-1).to(tl.int64)
    cols = (pid_t * TILE_V + tl.arange(0, TILE_V)).to(tl.int64)
    cols_mask = cols < V

    z = logits_tile(
        H, W, row_ids, rows_mask, cols, cols_mask,
        stride_hn, stride_hd, stride_wv, stride_wd, D,
        BLOCK_N, TILE_V, BLOCK_D, UPCAST, IEEE,
    )
    hit = cols[None, :] == labels[:, None]
    target = tl.sum(tl.where(hit, z, 0.0), axis=1)
    holds_label = tl.max(hit.to(tl.int32), axis=1) > 0

    z = tl.where(cols_mask[None, :], z, float("-inf"))
    tile_max = tl.max(z, axis=1)
    e = tl.exp(z - tile_max[:, None])
    tile_sum = tl.sum(e, axis=1)

    rows64 = offs_n.to(tl.int64)
    tl.store(TILE_MAX + rows64 * stride_pn + pid_t, tile_max, mask=rows_mask)
    tl.store(TILE_SUM + rows64 * stride_pn + pid_t, tile_sum, mask=rows_mask)
    tl.store(TARGET + offs_n, target, mask=rows_mask & holds_label)
    if STORE_E:
        e_ptrs = E + rows64[:, None] * stride_en + cols[None, :]
        tl.store(e_ptrs, e.to(E.dtype.element_ty), mask=rows_mask[:, None] & cols_mask[None, :])


def num_tiles(vocab_size: int) -> int:
    """T: the partials' columns, cdiv(V, TILE_V)."""
    return triton.cdiv(vocab_size, TILE_V)


def epilogue_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    store_e: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E [n, V] in hidden's dtype or None, tile_max fp32 [n, T], tile_sum fp32 [n, T], target fp32 [n])
    of hidden[row_ids] @ weight.T (module docstring).

    hidden [N_all, D], weight [V, D] (same dtype and device, any strides), row_ids int64 [n] selects
    the rows, labels int64 [n] in [0, V) for those rows (unchecked here: the callers' rows are kept
    rows, validated). store_e False: the forward-only form, nothing of size n x V written.
    """
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    tiles = num_tiles(vocab_size)
    device = hidden.device
    tile_max = torch.empty(n, tiles, device=device, dtype=torch.float32)
    tile_sum = torch.empty(n, tiles, device=device, dtype=torch.float32)
    target = torch.empty(n, device=device, dtype=torch.float32)
    e = torch.empty(n, vocab_size, device=device, dtype=hidden.dtype) if store_e else None
    if n == 0:
        return e, tile_max, tile_sum, target

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * tiles,)

    epilogue_forward_kernel[grid](
        hidden, weight, row_ids, labels, e if store_e else tile_max, tile_max, tile_sum, target,
        n, vocab_size, dim, row_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        e.stride(0) if store_e else 0, tile_max.stride(0),
        TILE_V=TILE_V, STORE_E=store_e,
        UPCAST=INTERPRET and hidden.dtype != torch.float32,
        IEEE=ieee_dots(hidden.dtype),
    )
    return e, tile_max, tile_sum, target
