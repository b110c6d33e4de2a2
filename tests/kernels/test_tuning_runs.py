"""Autotuning off the critical path: how many tuning runs a reference pass, an evaluation and the
two-call training path pay, counted on CPU.

Triton's autotuner times every config once per distinct key (the key's arguments plus the tensors'
dtypes) and process, unless its persisted cache (cache_results) already holds the key. The launchers
are called on meta tensors with their kernel swapped for a recorder, and the keys are computed as
triton.runtime.autotuner.Autotuner.run computes them: the count of distinct keys is the number of
tuning runs a GPU process would pay with an empty cache.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from triton.runtime.autotuner import Autotuner

from fastnpo.kernels import logprobs_backward as bwd
from fastnpo.kernels import logprobs_forward as fwd
from fastnpo.kernels import softmax_gradient as sg
from fastnpo.kernels.tiles import AUTOTUNE_CACHE, INTERPRET, ROW_BUCKETS
from fastnpo.ops.experimental import split

D, V = 4096, 128256


class KeyRecorder:
    """Stands in for an autotuned kernel and records the autotune key of each launch."""

    def __init__(self, autotuner: Autotuner):
        self.autotuner = autotuner
        self.keys = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tuner = self.autotuner
            named = {**dict(zip(tuner.arg_names, args, strict=False)), **kwargs}
            named = {k: v for k, v in named.items() if k in tuner.arg_names}
            key = [named[k] for k in tuner.keys if k in named]
            key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
            self.keys.append(tuple(key))

        return launch


@pytest.fixture
def recorders(monkeypatch):
    swapped = {}
    kernels = ((fwd, "logprobs_forward_kernel"), (bwd, "logprobs_backward_kernel"), (sg, "softmax_gradient_kernel"))
    for module, name in kernels:
        recorder = KeyRecorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorder)
        swapped[name] = recorder
    return swapped


def tensors(n, dtype=torch.bfloat16):
    meta = dict(device="meta")
    return (
        torch.empty(n, D, dtype=dtype, **meta),
        torch.empty(V, D, dtype=dtype, **meta),
        torch.empty(n, dtype=torch.int64, **meta),
        torch.empty(n, dtype=torch.int64, **meta),
        torch.empty(n, dtype=torch.float32, **meta),
        torch.empty(n, dtype=torch.float32, **meta),
    )


def kept_row_counts(seed=0):
    """Kept rows per batch of a TOFU-like reference pass and evaluation: batches of 1-64 question /
    answer pairs with 8-120 answer tokens each, and the odd last batch."""
    rng = random.Random(seed)
    counts = [sum(rng.randint(8, 120) for _ in range(rng.choice([1, 3, 8, 16, 32, 64]))) for _ in range(200)]
    return [*counts, 1, 7, 16384, 40000]


def test_reference_pass_and_evaluation_tune_at_most_once_per_bucket(recorders):
    counts = kept_row_counts()
    for n in counts:
        hidden, weight, row_ids, labels, _, _ = tensors(n)
        fwd.logprobs_forward(hidden, weight, row_ids, labels)
    keys = recorders["logprobs_forward_kernel"].keys
    assert len(keys) == len(counts)
    # power-of-two buckets from 16 tuned 11 times here (one per bucket 16 ... 16384)
    assert len(set(keys)) <= len(ROW_BUCKETS) == 3, sorted(set(keys))


def test_two_call_training_tunes_at_most_once_per_bucket_and_variant(recorders):
    for n in kept_row_counts(seed=1)[:60]:
        hidden, weight, row_ids, labels, lse, grad = tensors(n)
        for filter_eps in (0.0, 2.0**-12):
            bwd.logprobs_backward(
                hidden, weight, row_ids, labels, lse, grad, filter_eps=filter_eps, compute_dh=True, compute_dw=True
            )
        split.kernel_backward(
            hidden,
            weight,
            row_ids,
            labels,
            lse,
            grad,
            compute_dh=True,
            compute_dw=True,
            kernel=sg.softmax_gradient,
            multiple=sg.COLUMN_MULTIPLE,
        )
    backward = set(recorders["logprobs_backward_kernel"].keys)
    # exact and filtered are timed apart (FILTER is in the key), each at most once per bucket
    assert len({key for key in backward if key[3]}) <= len(ROW_BUCKETS)
    assert len({key for key in backward if not key[3]}) <= len(ROW_BUCKETS)
    assert len(backward) > len(ROW_BUCKETS) or len(ROW_BUCKETS) == 1
    # the split design's kernel: one key per bucket, whatever the vocabulary block's width
    assert len(set(recorders["softmax_gradient_kernel"].keys)) <= len(ROW_BUCKETS)


def test_tuning_results_persist_across_processes():
    # triton turns cache_results off under the interpreter, so on CPU the decorators are read.
    assert AUTOTUNE_CACHE == {"cache_results": True}
    for module in (fwd, bwd, sg):
        assert inspect.getsource(module).count("**AUTOTUNE_CACHE,") == 1, module.__name__
    for tuner in (fwd.logprobs_forward_kernel, bwd.logprobs_backward_kernel, sg.softmax_gradient_kernel):
        assert tuner.cache_results or INTERPRET, tuner
