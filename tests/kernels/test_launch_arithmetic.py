"""Launch arithmetic of the kernels, in pure Python (no kernel runs): vocabulary splits, the
autotune row bucket, and shared-memory pruning of the autotune configs."""

from __future__ import annotations

import pytest
import triton

from fastnpo.kernels import logprobs_backward as bwd
from fastnpo.kernels import logprobs_forward as fwd
from fastnpo.kernels.tiles import ROW_BUCKET_CAP, ROW_BUCKETS, operand_buffer_bytes, row_bucket, select_configs

H100_SMS = 132
LLAMA3_V = 128256


def programs(n, v, block_n, block_v, sms=H100_SMS):
    return triton.cdiv(n, block_n) * fwd.num_splits_for(n, v, sms, block_n, block_v)


@pytest.mark.parametrize("block_n", [64, 128])
def test_n4096_fills_at_least_two_nearly_full_waves(block_n):
    # The old rule assumed BLOCK_N=64: with the autotuner's BLOCK_N=128 it gave 32 x 5 = 160
    # programs on 132 SMs (~1.2 waves, the last nearly idle).
    total = programs(4096, LLAMA3_V, block_n, 128)
    assert total >= 2 * H100_SMS
    waves = triton.cdiv(total, H100_SMS)
    assert total / (waves * H100_SMS) >= 0.9, total


def test_splits_follow_block_n():
    # same rows, twice the BLOCK_N: half the row blocks, so at least as many slices
    assert fwd.num_splits_for(4096, LLAMA3_V, H100_SMS, 128, 128) > fwd.num_splits_for(
        4096, LLAMA3_V, H100_SMS, 64, 128
    )
    assert fwd.num_splits_for(4096, LLAMA3_V, H100_SMS, 128, 128) == 12  # 32 x 12 = 384 programs: 2.9 waves of 132


@pytest.mark.parametrize("n", [1, 7, 64, 300, 1000, 4096, 8192, 65536, 10**6])
@pytest.mark.parametrize("block_n,block_v", [(64, 128), (128, 128), (64, 256), (128, 256)])
@pytest.mark.parametrize("sms", [108, 132])
def test_split_bounds(n, block_n, block_v, sms):
    splits = fwd.num_splits_for(n, LLAMA3_V, sms, block_n, block_v)
    assert 1 <= splits <= fwd.MAX_SPLITS
    # enough programs to fill the GPU twice, unless capped by MAX_SPLITS
    assert triton.cdiv(n, block_n) * splits >= 2 * sms or splits == fwd.MAX_SPLITS


def test_split_caps():
    assert fwd.num_splits_for(10**6, LLAMA3_V, H100_SMS, 128, 128) == 1  # plenty of row blocks
    assert fwd.num_splits_for(1, LLAMA3_V, H100_SMS, 64, 128) == fwd.MAX_SPLITS
    assert fwd.num_splits_for(1, 300, H100_SMS, 64, 128) == 3  # no more slices than vocabulary tiles
    assert fwd.num_splits_for(0, 1, H100_SMS, 64, 128) == 1


def test_row_bucket():
    assert row_bucket(0) == row_bucket(1) == row_bucket(256) == ROW_BUCKETS[0]
    assert row_bucket(257) == ROW_BUCKETS[1]
    assert row_bucket(ROW_BUCKET_CAP) == row_bucket(10**7) == ROW_BUCKET_CAP
    counts = range(0, 40000, 97)
    buckets = [row_bucket(n) for n in counts]
    assert buckets == sorted(buckets)
    assert all(n <= b or b == ROW_BUCKET_CAP for n, b in zip(counts, buckets, strict=True))
    assert set(buckets) == set(ROW_BUCKETS) and len(ROW_BUCKETS) <= 3


def config(bn, bv, bd, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=4, num_stages=stages)


def test_shared_memory_estimates():
    # forward: num_stages x (H tile + W tile); equal to what triton compiles for sm_90 in bf16
    assert fwd.forward_shared_bytes(config(128, 256, 64, 3), 2) == 147_456
    assert fwd.forward_shared_bytes(config(128, 128, 32, 4), 2) == 65_536
    assert operand_buffer_bytes(64, 128, 64, 3, 4) == 2 * operand_buffer_bytes(64, 128, 64, 3, 2)
    # backward 64x256x64: compiled to 253,952 B on sm_90, above its 232,448 B
    assert bwd.backward_shared_bytes(config(64, 256, 64, 3), 2) == 253_952


def test_select_configs_prunes_to_the_limit():
    configs = [config(*c[:3], c[4]) for c in bwd.BACKWARD_CANDIDATES]
    sm90 = select_configs(configs, bwd.backward_shared_bytes, 232_448, 2)
    assert [c.kwargs["BLOCK_V"] for c in sm90] == [128, 128, 64, 64]  # 64x256x64 pruned
    sm80 = select_configs(configs, bwd.backward_shared_bytes, 166_912, 2)
    assert all(bwd.backward_shared_bytes(c, 2) <= 166_912 for c in sm80) and sm80
    # nothing fits: the smallest estimate is kept, so the autotuner always has a config
    tiny = select_configs(configs, bwd.backward_shared_bytes, 1, 2)
    assert len(tiny) == 1 and bwd.backward_shared_bytes(tiny[0], 2) == min(
        bwd.backward_shared_bytes(c, 2) for c in configs
    )


def test_autotuners_key_on_the_row_bucket_and_prune():
    for kernel in (fwd.logprobs_forward_kernel, bwd.logprobs_backward_kernel):
        # then the work-changing constexprs (tests/kernels/test_autotune_keys.py checks them all)
        assert kernel.keys[:3] == ["V", "D", "N_BUCKET"]
        assert kernel.early_config_prune is not None
    # forward trials launch different split counts into the same partials: restored after each
    assert {"FILTER", "COMPUTE_DH", "COMPUTE_DW"} <= set(bwd.logprobs_backward_kernel.keys)
    assert set(fwd.logprobs_forward_kernel.restore_value) == {"PARTIAL_LSE", "PARTIAL_TARGET"}
