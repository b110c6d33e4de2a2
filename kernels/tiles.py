"""Tile helpers shared by the forward, backward and softmax-gradient kernels.

The logits tile hidden[rows] @ weight[cols].T is recomputed in both passes; keeping its
code in one place guarantees the backward sees exactly the logits the forward saw.
"""

import os

import torch
import triton
import triton.language as tl

# The interpreter runs kernels on CPU tensors. It must be decided before any @triton.jit
# function is defined, so it is read once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def ieee_dots(dtype: torch.dtype) -> bool:
    """fp32 inputs: exact fp32 dots unless torch allows TF32 for its own fp32 matmuls
    (torch.backends.cuda.matmul.allow_tf32), so the op follows the same switch as torch.mm.
    bf16 / fp16: never (tensor cores with fp32 accumulation)."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


@triton.jit
def tile_dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST: the interpreter computes bf16/fp16 tl.dot wrongly, so operands are cast to fp32
    there. IEEE: exact fp32 dots (ieee_dots): fp32 inputs drop to TF32 only when torch allows it.
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


@triton.jit
def gradient_tile(
    ROW_IDS, LABELS, LSE, GRAD, N, V,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr,
):
    """This program's (row tile, vocabulary tile) in a gradient kernel's grid and what its rows carry:
    (offs_n, rows_mask, row_ids, labels, lse, g, cols, cols_mask); masked rows read lse = g = 0.

    Grouped order: GROUP_N row tiles sweep the vocabulary tiles together, so a wave of programs
    shares a few H and W tiles in L2 instead of streaming all of H per vocabulary tile."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_mask = offs_n < N
    row_ids = tl.load(ROW_IDS + offs_n, mask=rows_mask, other=0).to(tl.int64)
    labels = tl.load(LABELS + offs_n, mask=rows_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE + offs_n, mask=rows_mask, other=0.0)
    g = tl.load(GRAD + offs_n, mask=rows_mask, other=0.0)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols_mask = cols < V
    return offs_n, rows_mask, row_ids, labels, lse, g, cols, cols_mask


# Autotune key for the row count: a few row buckets, so that a reference pass or an evaluation, whose
# batches keep any number of rows, pays at most len(ROW_BUCKETS) tuning runs per kernel and shape
# (power-of-two buckets from 16 up cost up to 11). The tile ranking changes little with the rows: the
# gradient kernels' grids have cdiv(V, BLOCK_V) programs per row tile (1,000+ at real vocabularies),
# and the forward splits the vocabulary to fill the GPU; what remains is few row tiles (<= 256 rows:
# 2-4), a middling count and many.
ROW_BUCKETS = (256, 2048, 1 << 14)
ROW_BUCKET_CAP = ROW_BUCKETS[-1]

# Tuning results persist in triton's cache directory (keyed by triton, the GPU, the kernel's source,
# the autotune key and the configs): a later process (evaluation after training, the next run) reads
# them instead of re-timing. Passed to every triton.autotune of the project's kernels.
AUTOTUNE_CACHE = {"cache_results": True}


def row_bucket(num_rows: int) -> int:
    """The row-count bucket the autotuners key on: the smallest of ROW_BUCKETS >= num_rows, else the last."""
    return next((bucket for bucket in ROW_BUCKETS if int(num_rows) <= bucket), ROW_BUCKET_CAP)


def operand_buffer_bytes(block_n: int, block_v: int, block_d: int, num_stages: int, dtype_bytes: int) -> int:
    """Shared memory of the pipelined logits loop: num_stages copies of an H [BN, BD] and a W [BD, BV] tile.

    Exact for the forward kernel on sm_90 (triton 3.9 compiles it to this many bytes in bf16; sm_80 uses
    num_stages - 1 copies, so it is an upper bound there).
    """
    return num_stages * (block_n * block_d + block_d * block_v) * dtype_bytes


def select_configs(configs, shared_bytes, limit: int, dtype_bytes: int):
    """The configs whose estimated shared memory, shared_bytes(config, dtype_bytes), fits in `limit` bytes.

    Never empty: if nothing fits, the config with the smallest estimate is kept (the estimate is an
    upper bound, so it may still fit; the compile tests check every config that is kept).
    """
    kept = [c for c in configs if shared_bytes(c, dtype_bytes) <= limit]
    return kept or [min(configs, key=lambda c: shared_bytes(c, dtype_bytes))]


def shared_memory_limit(device) -> int | None:
    """Per-block shared memory (opt-in maximum) of a CUDA device, as triton checks it at launch; None elsewhere."""
    if INTERPRET or getattr(device, "type", None) != "cuda":
        return None
    from triton.runtime import driver

    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def prune_by_shared_memory(shared_bytes, tensor_arg: str = "H"):
    """An early_config_prune for triton.autotune: drops the configs that do not fit the launch device.

    Without it a config over the limit fails to launch during autotuning and is silently dropped
    (after compiling it); with it such a config is never compiled or timed.
    """

    def prune(configs, named_args, **kwargs):
        tensor = named_args[tensor_arg]
        limit = shared_memory_limit(tensor.device)
        if limit is None:
            return configs
        return select_configs(configs, shared_bytes, limit, tensor.element_size())

    return prune


def autotune_configs(candidates):
    """One config under the interpreter (its autotuner cannot run several), the list on GPU."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in candidates
    ]
