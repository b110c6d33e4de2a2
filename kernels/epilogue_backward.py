"""Fused-epilogue backward: dH and dW as GEMMs that scale E per (row, tile) while loading it.

epilogue_forward.py left E[r, v] = exp(z[r, v] - m[r, t(v)]) in the operand dtype. With the
log-sum-exp and the loss gradient g known (the caller's glue), the logits' gradient is

    dlogits[r, v] = scale[r, t(v)] * E[r, v]       scale[r, t] = -g[r] exp(m[r, t] - lse[r])  (fp32 [n, T])
    dlogits[r, y_r] = label_grad[r]                label_grad[r] = g[r] (1 - p_y), formed from the exact
                                                   fp32 target logit (never 1 - a rounded E)

and both kernels build it tile by tile in registers from E, never as an [n, V] buffer:

    dH[row_ids[r], d] = sum_v dlogits[r, v] W[v, d]     grid (row tiles x D tiles), K = V in BLOCK_K steps
    dW[v, d] (+)= sum_r dlogits[r, v] rows[r, d]        grid (V tiles x D tiles), K = the n rows
                                                         (rows = hidden[row_ids], gathered once by the
                                                         caller: a row index loaded inside the K loop
                                                         keeps triton's pipeliner at 2 stages of H and 1
                                                         of E; direct rows get num_stages of each)

The scaled tile is rounded once into the operand dtype and fed to tl.dot (fp32 accumulation), the
mixed-input GEMM pattern (the A operand comes from registers, not straight from shared memory).
Each output element is written by one program: no atomics. dH is written once into its rows (in
hidden's dtype); dW is written by the first chunk of rows and read-modify-written (fp32 sum, one
rounding into the weight's dtype) by each later one when ACCUMULATE: the caller's chunks are few
and large, so dW takes few large steps.

K-steps divide TILE_V (dH's BLOCK_K; dW's BLOCK_V tile along the vocabulary), so a step sees one
scale per row. Offsets row * stride are int64.
"""

import torch
import triton
import triton.language as tl

from .epilogue_forward import TILE_V, grouped_tile
from .tiles import AUTOTUNE_CACHE, INTERPRET, ieee_dots, prune_by_shared_memory, row_bucket, tile_dot

# dH: (BLOCK_N, BLOCK_D, BLOCK_K, GROUP_N, num_warps, num_stages) tried on GPU; BLOCK_K divides TILE_V.
# sm_90 bf16 compiles (tests/kernels/test_kernel_compile.py): 190-208 registers, no spills;
# (128, 64, 64, 8, 4, 4) was dropped: 255 registers, 36 bytes of spills.
DH_CANDIDATES = [
    (128, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (64, 128, 64, 8, 4, 4),
]
# dW: (BLOCK_V, BLOCK_D, BLOCK_K, num_warps, num_stages) tried on GPU; BLOCK_V divides TILE_V.
# sm_90 bf16 compiles: no spills (written and accumulating launches alike); registers in
# benchmarks/README.md.
DW_CANDIDATES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
]


def dh_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 16, "BLOCK_K": 16, "GROUP_N": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_K": bk, "GROUP_N": g}, num_warps=w, num_stages=s)
        for bn, bd, bk, g, w, s in DH_CANDIDATES
    ]


def dw_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_V": 16, "BLOCK_D": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_V": bv, "BLOCK_D": bd, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bv, bd, bk, w, s in DW_CANDIDATES
    ]


DH_CONFIGS = dh_configs()
DW_CONFIGS = dw_configs()
assert all(TILE_V % c.kwargs["BLOCK_K"] == 0 for c in DH_CONFIGS), "dH's K-steps must divide TILE_V"
assert all(TILE_V % c.kwargs["BLOCK_V"] == 0 for c in DW_CONFIGS), "dW's vocabulary tiles must divide TILE_V"


def dh_shared_bytes(config, dtype_bytes: int) -> int:
    """Pipelined operand buffers of the dH loop: an E [BN, BK] and a W [BK, BD] tile per stage, plus
    one staging copy of the scaled A tile; the compile tests check the bound."""
    k = config.kwargs
    bn, bd, bk = k["BLOCK_N"], k["BLOCK_D"], k["BLOCK_K"]
    return config.num_stages * (bn * bk + bk * bd) * dtype_bytes + bn * bk * dtype_bytes


def dw_shared_bytes(config, dtype_bytes: int) -> int:
    """Pipelined operand buffers of the dW loop: an E [BK, BV] and an H [BK, BD] tile per stage, plus
    one staging copy of the scaled, transposed A tile, or the fp32 output tile if larger."""
    k = config.kwargs
    bv, bd, bk = k["BLOCK_V"], k["BLOCK_D"], k["BLOCK_K"]
    loop = config.num_stages * (bk * bv + bk * bd) * dtype_bytes + bv * bk * dtype_bytes
    return max(loop, bv * bd * 4)


@triton.autotune(
    configs=DH_CONFIGS,
    # Each trial writes every kept row of DH it owns, and nothing else: no restore.
    key=["V", "D", "N_BUCKET", "TILE_V", "UPCAST", "IEEE"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(dh_shared_bytes, "E")},
    **AUTOTUNE_CACHE,
)
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def epilogue_dh_kernel(
    E, SCALE, LABELS, LABEL_GRAD, W, ROW_IDS, DH,
    N, V, D, N_BUCKET,
    stride_en, stride_sn, stride_wv, stride_wd, stride_dn, stride_dd,
    TILE_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_n, pid_d = grouped_tile(tl.program_id(0), num_n, num_d, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_mask = offs_n < N
    rows64 = offs_n.to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=rows_mask, other=-1).to(tl.int64)
    label_grad = tl.load(LABEL_GRAD + offs_n, mask=rows_mask, other=0.0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    e_rows = E + rows64[:, None] * stride_en
    s_rows = SCALE + rows64 * stride_sn
    w_cols = W + offs_d[None, :].to(tl.int64) * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, V, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        cols_mask = cols < V
        e = tl.load(e_rows + cols[None, :], mask=rows_mask[:, None] & cols_mask[None, :], other=0.0)
        scale = tl.load(s_rows + k0 // TILE_V, mask=rows_mask, other=0.0)
        dlogits = tl.where(cols[None, :] == labels[:, None], label_grad[:, None], e.to(tl.float32) * scale[:, None])
        w = tl.load(w_cols + cols[:, None] * stride_wv, mask=cols_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tile_dot(dlogits.to(W.dtype.element_ty), w, acc, UPCAST, IEEE)

    row_ids = tl.load(ROW_IDS + offs_n, mask=rows_mask, other=0).to(tl.int64)
    dh_ptrs = DH + row_ids[:, None] * stride_dn + offs_d[None, :].to(tl.int64) * stride_dd
    tl.store(dh_ptrs, acc.to(DH.dtype.element_ty), mask=rows_mask[:, None] & d_mask[None, :])


@triton.autotune(
    configs=DW_CONFIGS,
    key=["V", "D", "N_BUCKET", "TILE_V", "ACCUMULATE", "UPCAST", "IEEE"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(dw_shared_bytes, "E")},
    # An accumulating trial adds into DW: the autotuner restores it before the real launch.
    restore_value=["DW"],
    **AUTOTUNE_CACHE,
)
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def epilogue_dw_kernel(
    E, SCALE, LABELS, LABEL_GRAD, ROWS, DW,
    N, V, D, N_BUCKET,
    stride_en, stride_sn, stride_hn, stride_hd, stride_wv, stride_wd,
    TILE_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # D tiles fastest: the programs of one vocabulary tile run together and read its E columns once.
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_v = pid // num_d
    pid_d = pid % num_d
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols_mask = cols < V
    tile = (pid_v * BLOCK_V) // TILE_V  # this program's columns lie in one forward tile
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_d64 = offs_d.to(tl.int64)

    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < N
        k64 = offs_k.to(tl.int64)
        labels = tl.load(LABELS + offs_k, mask=k_mask, other=-1).to(tl.int64)
        label_grad = tl.load(LABEL_GRAD + offs_k, mask=k_mask, other=0.0)
        scale = tl.load(SCALE + k64 * stride_sn + tile, mask=k_mask, other=0.0)
        # E read as its transpose [BLOCK_V, BLOCK_K]: columns of dlogits are the rows of this tile.
        e = tl.load(E + k64[None, :] * stride_en + cols[:, None], mask=cols_mask[:, None] & k_mask[None, :], other=0.0)
        dlogits_t = tl.where(cols[:, None] == labels[None, :], label_grad[None, :], e.to(tl.float32) * scale[None, :])
        h = tl.load(
            ROWS + k64[:, None] * stride_hn + offs_d64[None, :] * stride_hd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = tile_dot(dlogits_t.to(ROWS.dtype.element_ty), h, acc, UPCAST, IEEE)

    dw_ptrs = DW + cols[:, None] * stride_wv + offs_d64[None, :] * stride_wd
    out_mask = cols_mask[:, None] & d_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(dw_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=out_mask)


def _check_scales(e, scale, labels, label_grad):
    n, vocab_size = e.shape
    assert e.stride(1) == 1, "E must have unit column stride"
    assert scale.shape == (n, triton.cdiv(vocab_size, TILE_V)) and scale.dtype == torch.float32
    assert scale.stride(1) == 1, "scale must have unit column stride"
    assert labels.shape == label_grad.shape == (n,) and label_grad.dtype == torch.float32


def epilogue_dh(
    e: torch.Tensor,
    scale: torch.Tensor,
    labels: torch.Tensor,
    label_grad: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    dh: torch.Tensor,
) -> None:
    """dh[row_ids[r]] = dlogits[r] @ weight for the n rows of E (module docstring), written in dh's dtype;
    dh's other rows untouched. e [n, V] and weight [V, D] in the operand dtype, scale fp32 [n, T],
    labels int64 [n], label_grad fp32 [n], row_ids int64 [n] (distinct rows of dh [N_all, D])."""
    _check_scales(e, scale, labels, label_grad)
    n, vocab_size = e.shape
    dim = weight.shape[1]
    if n == 0:
        return

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(dim, meta["BLOCK_D"]),)

    epilogue_dh_kernel[grid](
        e, scale, labels, label_grad, weight, row_ids, dh,
        n, vocab_size, dim, row_bucket(n),
        e.stride(0), scale.stride(0), weight.stride(0), weight.stride(1), dh.stride(0), dh.stride(1),
        TILE_V=TILE_V,
        UPCAST=INTERPRET and weight.dtype != torch.float32,
        IEEE=ieee_dots(weight.dtype),
    )


def epilogue_dw(
    e: torch.Tensor,
    scale: torch.Tensor,
    labels: torch.Tensor,
    label_grad: torch.Tensor,
    rows: torch.Tensor,
    dw: torch.Tensor,
    accumulate: bool,
) -> None:
    """dw (+)= dlogits.T @ rows over the n rows of E, fp32 accumulation, one rounding into dw's dtype:
    written (accumulate False: every element of dw [V, D]) or added to what dw holds. rows [n, D]: the
    chunk's hidden rows (hidden[row_ids], any strides), in the operand dtype."""
    _check_scales(e, scale, labels, label_grad)
    n, vocab_size = e.shape
    assert rows.shape == (n, dw.shape[1]), "rows must be [n, D]: the hidden rows of E's rows"
    dim = rows.shape[1]
    if n == 0:
        if not accumulate:
            dw.zero_()
        return

    def grid(meta):
        return (triton.cdiv(vocab_size, meta["BLOCK_V"]) * triton.cdiv(dim, meta["BLOCK_D"]),)

    epilogue_dw_kernel[grid](
        e, scale, labels, label_grad, rows, dw,
        n, vocab_size, dim, row_bucket(n),
        e.stride(0), scale.stride(0), rows.stride(0), rows.stride(1), dw.stride(0), dw.stride(1),
        TILE_V=TILE_V, ACCUMULATE=accumulate,
        UPCAST=INTERPRET and rows.dtype != torch.float32,
        IEEE=ieee_dots(rows.dtype),
    )
