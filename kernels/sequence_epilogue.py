"""Epilogue kernels of the one-pass design: log-sum-exp, target logit and dlogits of an fp32 logits buffer.

fastnpo/ops/one_pass.py makes a chunk's fp32 logits [n, V] with one library matmul; these two
kernels do the rest of the chunk's elementwise work on that buffer:

    row_statistics    one read of each row, which it leaves as it is: an online max / sum of exp
                      over BLOCK_V-wide column blocks gives lse [n]; the target logit
                      logits[r, labels[r]] is one more load per row. Token log-prob = target - lse.
    logits_gradient_  one read, one write, IN PLACE: dlogits[r, v] = grad[r] * (onehot(labels[r] == v)
                      - exp(logits[r, v] - lse[r])), computed in fp32 and rounded once into the
                      operand dtype of the gradient matmuls (bf16 / fp16). The label's column is
                      grad * (1 - p_y) in fp32 before that rounding, never a difference of two
                      rounded numbers (p_y ~ 1 would cancel them). One program per row walks its
                      column blocks in order and stores the 2-byte dlogits over the first half of
                      the row's own fp32 storage (block j's outputs land on fp32 slots
                      [j B / 2, (j + 1) B / 2), all read by this program already; a barrier between
                      each block's loads and its stores keeps a lagging warp's reads ahead of the
                      other warps' writes). The fp32 logits and the dlogits never coexist: one
                      [n, V] fp32 buffer per chunk in all. The result is a [n, V] view with row
                      stride 2 x (the fp32 row stride), which the matmuls take as their lda.

Bytes per logit in bf16: 4 (statistics read) + 4 (gradient read) + 2 (bf16 write) = 10, against 30
for the torch-op epilogue they replace (row max, subtract, exp, row sums, scale: five passes).

Grids: row_statistics one program per BLOCK_N rows looping over the vocabulary (no atomics: a row's
reduction stays in one program); logits_gradient_ one program per row looping over the vocabulary
(no other program touches its row's storage). Offsets row * stride are int64.
"""

import torch
import triton
import triton.language as tl

from .tiles import INTERPRET, prune_by_shared_memory, row_bucket

# row_statistics' (BLOCK_N, BLOCK_V, num_warps, num_stages) tried on GPU. Both kernels are bandwidth-bound streams:
# 16-32 fp32 elements per thread per step keep enough loads in flight; a row per program is enough
# programs at a chunk's ~2048 rows (15 per SM on 132 SMs).
STATISTICS_CANDIDATES = [
    (1, 4096, 4, 1),
    (1, 8192, 8, 1),
    (1, 16384, 16, 1),
    (2, 4096, 8, 1),
]


def epilogue_configs(candidates):
    """One config under the interpreter (its autotuner cannot run several; small tiles with several
    rows, so that tests reach the row and column masks), the list on GPU (tiles.autotune_configs' rule)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_V": 256}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w, num_stages=s) for bn, bv, w, s in candidates
    ]


STATISTICS_CONFIGS = epilogue_configs(STATISTICS_CANDIDATES)


def statistics_shared_bytes(config, dtype_bytes: int) -> int:
    """row_statistics_kernel's shared memory: the cross-warp scratch of its two row reductions per
    step (max, sum), at most one fp32 per warp and row each. No operand buffers: its loads are not
    pipelined through shared memory. triton 3.9 compiles every config to half this (one scratch
    for both reductions) on sm_90 and sm_80. dtype_bytes is unused (the logits are fp32 in every
    case); the compile tests check the bound on every config."""
    del dtype_bytes
    return 2 * config.kwargs["BLOCK_N"] * config.num_warps * 4


@triton.autotune(
    configs=STATISTICS_CONFIGS,
    # V fixed per model, the row count per chunk: configs are timed per row bucket. Every trial
    # writes all of LSE and TARGET and reads only LOGITS and LABELS: nothing to restore.
    key=["V", "N_BUCKET"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(statistics_shared_bytes, "LOGITS")},
)
# The row count changes every chunk: not specialising on it keeps one binary per config.
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def row_statistics_kernel(
    LOGITS, LABELS, LSE, TARGET,
    N, V, N_BUCKET, stride_ln,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_mask = offs_n < N
    # Rows past N read row N - 1 and are not stored: every row read is real, so its running max is
    # finite after the first block (V >= 1) and no -inf - -inf appears.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    row_ptrs = LOGITS + rows[:, None] * stride_ln

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptrs + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    labels = tl.load(LABELS + rows).to(tl.int64)
    target = tl.load(LOGITS + rows * stride_ln + labels)
    tl.store(LSE + offs_n, lse, mask=rows_mask)
    tl.store(TARGET + offs_n, target, mask=rows_mask)


def _check_buffer(name: str, x: torch.Tensor, shape: tuple[int, int]) -> None:
    assert x.shape == shape and x.stride(1) == 1, f"{name} must be {list(shape)} with unit column stride"


def row_statistics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit), fp32 [n] each, of the rows of `logits`.

    logits fp32 [n, V] with unit column stride (any row stride); labels int64 [n], each in [0, V)
    (the kernel reads logits[r, labels[r]] unchecked: the callers' rows are kept rows, validated).
    """
    n, vocab_size = logits.shape
    _check_buffer("logits", logits, (n, vocab_size))
    assert logits.dtype == torch.float32 and labels.shape == (n,)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    target = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n == 0:
        return lse, target

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    row_statistics_kernel[grid](
        logits, labels, lse, target,
        n, vocab_size, row_bucket(n), logits.stride(0),
    )
    return lse, target


# logits_gradient_ (in place): one row per program, BLOCK_V columns per step, in column order.
INPLACE_CANDIDATES = [(1024, 4), (2048, 4), (4096, 8)]


def inplace_configs():
    if INTERPRET:  # small blocks: tests reach several blocks per row and the ragged last one
        return [triton.Config({"BLOCK_V": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=1) for bv, w in INPLACE_CANDIDATES]


@triton.autotune(
    configs=inplace_configs(),
    key=["V", "N_BUCKET"],
    # Every trial overwrites LOGITS: the autotuner restores it before the real launch.
    restore_value=["LOGITS"],
)
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def logits_gradient_inplace_kernel(
    LOGITS, OUT, LABELS, LSE, GRAD,
    N, V, N_BUCKET, stride_ln, stride_on,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    g = tl.load(GRAD + row)
    src = LOGITS + row * stride_ln
    dst = OUT + row * stride_on
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(src + cols, mask=mask, other=float("-inf"))
        # fp32 throughout, one rounding at the store: the label's column is g * (1 - p_y).
        dlogits = g * ((cols == label).to(tl.float32) - tl.exp(x - lse))
        # Every warp has consumed its loads of this block (and of the earlier ones) before any warp
        # stores over them: the stores of block j cover fp32 slots [j B / 2, (j + 1) B / 2).
        tl.debug_barrier()
        tl.store(dst + cols, dlogits.to(OUT.dtype.element_ty), mask=mask)


def logits_gradient_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """dlogits[r, v] = grad[r] * (onehot(labels[r] == v) - exp(logits[r, v] - lse[r])) IN PLACE:
    returns dlogits [n, V] in `dtype` (bf16 / fp16), a view over the first half of each row of
    `logits`' storage, whose fp32 values are consumed (not valid after).

    logits fp32 [n, V] with unit column stride (any row stride: a slice of a larger buffer is
    fine, its other columns untouched); labels int64, lse and grad fp32 [n].
    """
    n, vocab_size = logits.shape
    _check_buffer("logits", logits, (n, vocab_size))
    assert logits.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
    assert labels.shape == lse.shape == grad.shape == (n,)
    out = logits.view(dtype)[:, :vocab_size]  # row stride 2 x logits', same first byte per row
    if n == 0:
        return out
    logits_gradient_inplace_kernel[(n,)](
        logits, out, labels, lse, grad,
        n, vocab_size, row_bucket(n), logits.stride(0), out.stride(0),
    )
    return out
