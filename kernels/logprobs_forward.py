"""Forward kernel: per row, the log-sum-exp over the vocabulary and the target logit.

Each program owns BLOCK_N rows and one of `num_splits` contiguous slices of the vocabulary.
It walks its slice tile by tile (tiles of hidden @ weight.T from tl.dot), keeps an online
max / sum-exp, and picks up the target logit when the tile holds it. Only [num_splits, N]
floats leave the kernel; the launcher folds the slices with a logsumexp. Splitting the
vocabulary keeps the GPU busy when there are few rows (short batches, long vocabularies).
"""

import torch
import triton
import triton.language as tl

from .tiles import INTERPRET, autotune_configs, logits_tile

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) tried on GPU.
FORWARD_CANDIDATES = [
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
]


@triton.autotune(configs=autotune_configs(FORWARD_CANDIDATES), key=["V", "D"])
@triton.jit
def logprobs_forward_kernel(
    H, W, ROW_IDS, LABELS, PARTIAL_LSE, PARTIAL_TARGET,
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

    # An empty slice leaves max=-inf, sum=0, so lse=-inf: the launcher's logsumexp ignores it.
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
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
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        running_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)

    lse = running_max + tl.log(running_sum)
    out = split.to(tl.int64) * N + offs_n
    tl.store(PARTIAL_LSE + out, lse, mask=rows_mask)
    tl.store(PARTIAL_TARGET + out, target, mask=rows_mask)


def default_num_splits(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """Enough vocabulary slices that row blocks x slices fill the GPU about twice over."""
    if INTERPRET or device.type != "cuda":
        return 2 if vocab_size > 32 else 1
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(num_rows, 64)
    return max(1, min(16, triton.cdiv(2 * sm_count, row_blocks), triton.cdiv(vocab_size, 128)))


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit, fp32 [len(row_ids)] each, of hidden[row_ids] @ weight.T.

    hidden [N_all, D], weight [V, D] (same dtype, any strides), row_ids int64 [N] selects the
    rows, labels int64 [N] in [0, V) for those rows.
    """
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    if num_splits is None:
        num_splits = default_num_splits(n, vocab_size, hidden.device)
    partial_lse = torch.empty(num_splits, n, device=hidden.device, dtype=torch.float32)
    partial_target = torch.empty_like(partial_lse)
    if n == 0:
        return partial_lse.new_empty(0), partial_lse.new_empty(0)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), num_splits)

    logprobs_forward_kernel[grid](
        hidden, weight, row_ids, labels, partial_lse, partial_target,
        n, vocab_size, dim,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        UPCAST=INTERPRET and hidden.dtype != torch.float32,
        IEEE=hidden.dtype == torch.float32,
    )
    return torch.logsumexp(partial_lse, dim=0), partial_target.sum(dim=0)
