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

from .tiles import (
    AUTOTUNE_CACHE,
    INTERPRET,
    autotune_configs,
    ieee_dots,
    logits_tile,
    operand_buffer_bytes,
    prune_by_shared_memory,
    row_bucket,
)

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) tried on GPU.
FORWARD_CANDIDATES = [
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
]


FORWARD_CONFIGS = autotune_configs(FORWARD_CANDIDATES)
MAX_SPLITS = 16


def forward_shared_bytes(config, dtype_bytes: int) -> int:
    """Shared memory the forward kernel needs with this config (exact on sm_90, an upper bound on sm_80)."""
    k = config.kwargs
    return operand_buffer_bytes(k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_D"], config.num_stages, dtype_bytes)


@triton.autotune(
    configs=FORWARD_CONFIGS,
    # N_BUCKET (row_bucket(N)): the best tile depends on the row count, and the number of
    # vocabulary splits follows the chosen BLOCK_N, so configs are timed per bucket.
    # IEEE (exact fp32 dots or TF32) and UPCAST change the dots' work: each gets its own timing.
    key=["V", "D", "N_BUCKET", "UPCAST", "IEEE"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(forward_shared_bytes)},
    # Configs with different BLOCK_N launch different numbers of splits: each trial must start
    # from the -inf / 0 partials, or a trial with more splits would leave stale slices behind.
    restore_value=["PARTIAL_LSE", "PARTIAL_TARGET"],
    **AUTOTUNE_CACHE,
)
# The row count changes every step (dynamic padding, kept rows): not specialising on it (N % 16,
# N == 1) keeps one compiled binary per config instead of one per specialisation, so a new
# batch shape costs at most an autotune of N_BUCKET, never a recompile.
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def logprobs_forward_kernel(
    H, W, ROW_IDS, LABELS, PARTIAL_LSE, PARTIAL_TARGET,
    N, V, D, N_BUCKET,
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


def num_splits_for(num_rows: int, vocab_size: int, sm_count: int, block_n: int, block_v: int) -> int:
    """Vocabulary slices for BLOCK_N x BLOCK_V tiles: row blocks x slices fill the GPU at least twice over.

    From the smallest count that gives 2 * sm_count programs up to twice that (at most MAX_SPLITS and
    one slice per vocabulary tile), the count with the shortest makespan, waves x (1 / splits) in
    units of a whole-vocabulary program, taking a larger count only for a gain over 5% (each slice
    re-reads its rows of H and adds partials to fold): the programs are long, so a nearly empty
    last wave costs almost a whole program's time.
    """
    row_blocks = triton.cdiv(max(num_rows, 1), block_n)
    cap = max(1, min(MAX_SPLITS, triton.cdiv(vocab_size, block_v)))
    low = min(cap, max(1, triton.cdiv(2 * sm_count, row_blocks)))

    def makespan(splits):
        return triton.cdiv(row_blocks * splits, sm_count) / splits

    best = low
    for splits in range(low + 1, min(cap, 2 * low) + 1):
        if makespan(splits) < 0.95 * makespan(best):
            best = splits
    return best


def default_num_splits(num_rows: int, vocab_size: int, device: torch.device, block_n: int, block_v: int) -> int:
    """num_splits_for on the launch device (from the autotuner's chosen BLOCK_N / BLOCK_V); 2 or 1 on CPU."""
    if INTERPRET or device.type != "cuda":
        return 2 if vocab_size > 32 else 1
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return num_splits_for(num_rows, vocab_size, sm_count, block_n, block_v)


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit, fp32 [len(row_ids)] each, of hidden[row_ids] @ weight.T.

    hidden [N_all, D], weight [V, D] (same dtype, any strides), row_ids int64 [N] selects the
    rows, labels int64 [N] in [0, V) for those rows. num_splits: vocabulary slices; by default
    chosen from the autotuner's BLOCK_N and BLOCK_V (default_num_splits).
    """
    n, (vocab_size, dim) = row_ids.numel(), weight.shape
    if n == 0:
        empty = torch.empty(0, device=hidden.device, dtype=torch.float32)
        return empty, empty.clone()
    if num_splits is None:
        # The split count follows the config the autotuner picks, known only inside the grid
        # function: size the partials for the most any config may launch, and leave the slices a
        # config does not launch at lse = -inf, target = 0 so that they drop out of the folds below.
        def splits(meta):
            return default_num_splits(n, vocab_size, hidden.device, meta["BLOCK_N"], meta["BLOCK_V"])

        rows = max(splits(config.kwargs) for config in FORWARD_CONFIGS)
        partial_lse = torch.full((rows, n), float("-inf"), device=hidden.device, dtype=torch.float32)
        partial_target = torch.zeros_like(partial_lse)
    else:

        def splits(meta):
            return num_splits

        partial_lse = torch.empty(num_splits, n, device=hidden.device, dtype=torch.float32)
        partial_target = torch.empty_like(partial_lse)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), splits(meta))

    logprobs_forward_kernel[grid](
        hidden, weight, row_ids, labels, partial_lse, partial_target,
        n, vocab_size, dim, row_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        UPCAST=INTERPRET and hidden.dtype != torch.float32,
        IEEE=ieee_dots(hidden.dtype),
    )
    return torch.logsumexp(partial_lse, dim=0), partial_target.sum(dim=0)
