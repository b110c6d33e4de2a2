"""Epilogue kernels of the one-pass design: log-sum-exp, target logit and dlogits of an fp32 logits buffer.

fastnpo/ops/one_pass.py makes a chunk's fp32 logits [n, V] with one library matmul; these two
kernels do the rest of the chunk's elementwise work on that buffer:

    row_statistics    one read of each row, which it leaves as it is: an online max / sum of exp
                      over BLOCK_V-wide column blocks gives lse [n]; the target logit
                      logits[r, labels[r]] is one more load per row. Token log-prob = target - lse.
                      without_label=True (CE-U, Cross-Entropy Unlearning) also gives, from the same
                      read, the log-sum-exp and the mean logit of the distribution WITHOUT the
                      label's column, summed directly over the other columns (a second online max,
                      sum and sum of exp(x - m)(x - m)), never as a difference with the label's
                      term, which cancels where p_y ~ 1: CE-U's value is lse - mean_without_label,
                      and logits_gradient_(without_label=True) takes lse_without_label for its
                      gradient. No extra memory traffic; a second exp per element.
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
    for both reductions) on sm_90 and sm_80, the WITHOUT_LABEL variant too (its three more
    reductions per step reuse that scratch). dtype_bytes is unused (the logits are fp32 in every
    case); the compile tests check the bound on every config."""
    del dtype_bytes
    return 2 * config.kwargs["BLOCK_N"] * config.num_warps * 4


@triton.autotune(
    configs=STATISTICS_CONFIGS,
    # V fixed per model, the row count per chunk: configs are timed per row bucket, and per variant
    # (WITHOUT_LABEL adds a second exp per element). Every trial writes all of its outputs and reads
    # only LOGITS and LABELS: nothing to restore.
    key=["V", "N_BUCKET", "WITHOUT_LABEL"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(statistics_shared_bytes, "LOGITS")},
)
# The row count changes every chunk: not specialising on it keeps one binary per config.
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def row_statistics_kernel(
    LOGITS, LABELS, LSE, TARGET, LSE_WITHOUT_LABEL, MEAN_WITHOUT_LABEL,
    N, V, N_BUCKET, stride_ln,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, WITHOUT_LABEL: tl.constexpr,
):
    # WITHOUT_LABEL=False (LSE_WITHOUT_LABEL, MEAN_WITHOUT_LABEL None) compiles the kernel's code
    # without any of the `if WITHOUT_LABEL` blocks: the plain statistics, unchanged.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_mask = offs_n < N
    # Rows past N read row N - 1 and are not stored: every row read is real, so its running max is
    # finite after the first block (V >= 1) and no -inf - -inf appears.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    row_ptrs = LOGITS + rows[:, None] * stride_ln

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if WITHOUT_LABEL:
        # The other columns' online statistics: their max m, S = sum exp(x - m) and
        # A = sum exp(x - m) (x - m). Their max is -inf until a block holds another column that is
        # not -inf (the first block, a block holding only the label or only columns past V).
        labels = tl.load(LABELS + rows).to(tl.int64)
        label_cols = labels.to(tl.int32)  # < V < 2^31: an int32 compare per element, not an int64 one
        other_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        other_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        other_moment = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptrs + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
        if WITHOUT_LABEL:
            xo = tl.where(cols[None, :] == label_cols[:, None], float("-inf"), x)
            new_other = tl.maximum(other_max, tl.max(xo, axis=1))
            # base = the new max where it is finite, 0 while every other column so far is -inf
            # (S = A = 0 then, and -inf - -inf would be NaN).
            base = tl.where(new_other == float("-inf"), 0.0, new_other)
            # m_old - m_new <= 0; 0 before the first finite column (S = A = 0: c = 1 rescales nothing).
            shift = tl.where(other_max == float("-inf"), 0.0, other_max - base)
            c = tl.exp(shift)
            d = xo - base[:, None]  # -inf at the label, past V and at -inf logits
            e = tl.exp(d)
            # exp(d) d would be 0 * -inf = NaN where d = -inf: d is replaced by 0 wherever exp(d) is 0
            # (there and where exp(d) underflows), so those terms are 0 and no NaN is formed.
            ed = e * tl.where(e > 0.0, d, 0.0)
            # A_new = c (A + (m_old - m_new) S) + block terms, with the old S
            other_moment = c * (other_moment + shift * other_sum) + tl.sum(ed, axis=1)
            other_sum = c * other_sum + tl.sum(e, axis=1)
            other_max = new_other
    lse = running_max + tl.log(running_sum)

    if not WITHOUT_LABEL:
        labels = tl.load(LABELS + rows).to(tl.int64)
    target = tl.load(LOGITS + rows * stride_ln + labels)
    tl.store(LSE + offs_n, lse, mask=rows_mask)
    tl.store(TARGET + offs_n, target, mask=rows_mask)
    if WITHOUT_LABEL:
        # No other finite column (V == 1): m = -inf, S = A = 0, so -inf and -inf + 0 / 0 = NaN.
        tl.store(LSE_WITHOUT_LABEL + offs_n, other_max + tl.log(other_sum), mask=rows_mask)
        tl.store(MEAN_WITHOUT_LABEL + offs_n, other_max + other_moment / other_sum, mask=rows_mask)


def _check_buffer(name: str, x: torch.Tensor, shape: tuple[int, int]) -> None:
    assert x.shape == shape and x.stride(1) == 1, f"{name} must be {list(shape)} with unit column stride"


def row_statistics(
    logits: torch.Tensor, labels: torch.Tensor, *, without_label: bool = False
) -> tuple[torch.Tensor, ...]:
    """(log-sum-exp, target logit), fp32 [n] each, of the rows of `logits`.

    logits fp32 [n, V] with unit column stride (any row stride); labels int64 [n], each in [0, V)
    (the kernel reads logits[r, labels[r]] unchecked: the callers' rows are kept rows, validated).

    without_label=True (CE-U, Cross-Entropy Unlearning) returns (lse, target, lse_without_label,
    mean_without_label), all fp32 [n], from the same single read of the logits (a second exp per
    element, no extra memory traffic), with y = labels[r]:

        lse_without_label[r]  = log sum_{v != y} exp(l[r, v])
        mean_without_label[r] = sum_{v != y} q_v l[r, v],  q = softmax of l[r] over v != y

    both summed directly over the other columns (their own online max m, S = sum exp(l - m) and
    A = sum exp(l - m)(l - m): mean = m + A / S), never as S_all - exp(l_y), which cancels
    catastrophically where p_y ~ 1 (memorised forget data). CE-U's per-token value is
    lse - mean_without_label; 1 - p_y = exp(lse_without_label - lse), and logits_gradient_(
    without_label=True) takes lse_without_label for the gradient (ops/one_pass.py, "CE-U").
    A row with no other column above -inf (V == 1) gives lse_without_label = -inf and
    mean_without_label = NaN; callers refuse V < 2. The lse and target are bitwise those of the
    default call.
    """
    n, vocab_size = logits.shape
    _check_buffer("logits", logits, (n, vocab_size))
    assert logits.dtype == torch.float32 and labels.shape == (n,)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    target = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse_without_label = mean_without_label = None
    if without_label:
        lse_without_label = torch.empty(n, device=logits.device, dtype=torch.float32)
        mean_without_label = torch.empty(n, device=logits.device, dtype=torch.float32)
    outputs = (lse, target) if not without_label else (lse, target, lse_without_label, mean_without_label)
    if n == 0:
        return outputs

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    row_statistics_kernel[grid](
        logits, labels, lse, target, lse_without_label, mean_without_label,
        n, vocab_size, row_bucket(n), logits.stride(0),
        WITHOUT_LABEL=bool(without_label),
    )
    return outputs


# logits_gradient_ (in place): one row per program, BLOCK_V columns per step, in column order.
INPLACE_CANDIDATES = [(1024, 4), (2048, 4), (4096, 8)]


def inplace_configs():
    if INTERPRET:  # small blocks: tests reach several blocks per row and the ragged last one
        return [triton.Config({"BLOCK_V": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=1) for bv, w in INPLACE_CANDIDATES]


@triton.autotune(
    configs=inplace_configs(),
    key=["V", "N_BUCKET", "WITHOUT_LABEL"],
    # Every trial overwrites LOGITS: the autotuner restores it before the real launch.
    restore_value=["LOGITS"],
)
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def logits_gradient_inplace_kernel(
    LOGITS, OUT, LABELS, LSE, GRAD,
    N, V, N_BUCKET, stride_ln, stride_on,
    WITHOUT_LABEL: tl.constexpr, BLOCK_V: tl.constexpr,
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
        if WITHOUT_LABEL:  # g * (onehot - q), q the label-excluded softmax (LSE: its log-sum-exp)
            others = tl.where(cols == label, float("-inf"), x)  # no exp(l_y - lse) overflow where p_y ~ 1
            dlogits = tl.where(cols == label, g, -g * tl.exp(others - lse))
        else:  # fp32 throughout, one rounding at the store: the label's column is g * (1 - p_y).
            dlogits = g * ((cols == label).to(tl.float32) - tl.exp(x - lse))
        # Every warp has consumed its loads of this block (and of the earlier ones) before any warp
        # stores over them: the stores of block j cover fp32 slots [j B / 2, (j + 1) B / 2).
        tl.debug_barrier()
        tl.store(dst + cols, dlogits.to(OUT.dtype.element_ty), mask=mask)


def logits_gradient_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    dtype: torch.dtype,
    *,
    without_label: bool = False,
) -> torch.Tensor:
    """dlogits[r, v] = grad[r] * (onehot(labels[r] == v) - exp(logits[r, v] - lse[r])) IN PLACE:
    returns dlogits [n, V] in `dtype` (bf16 / fp16), a view over the first half of each row of
    `logits`' storage, whose fp32 values are consumed (not valid after).

    logits fp32 [n, V] with unit column stride (any row stride: a slice of a larger buffer is
    fine, its other columns untouched); labels int64, lse and grad fp32 [n].
    without_label: lse is the label-excluded log-sum-exp (row_statistics(without_label=True)'s) and
    the label's column is grad[r] itself: grad * (onehot - q), q the softmax over the other columns.
    A per-token CE-U term's gradient and a sequence term's both take this form (ops/one_pass.py), so
    nothing scales by p_y / (1 - p_y), unbounded where p_y ~ 1. Same cost: one exp per element.
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
        WITHOUT_LABEL=without_label,
    )
    return out
