"""Build or load: the cache for a key, computed once (by a collective compute on several ranks), and a spot check."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch
from torch import Tensor

from .fingerprint import cache_key
from .store import PREFIX, LogpsAndCounts, RefLogprobs, _normalize, _read, cache_path, save_ref_logprobs


def get_or_build_ref_logprobs(
    cache_dir,
    parts: dict[str, str],
    compute: Callable[[], LogpsAndCounts],
    *,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int | None = None,
    barrier: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    all_agree: Callable[[bool], bool] | None = None,
) -> tuple[RefLogprobs, bool]:
    """Load the cache for ``parts`` from ``cache_dir``, or compute, store and reload it. Returns (cache, hit).

    Hit: every rank loads ``ref-logprobs-<key[:16]>.safetensors`` and logs it. Miss (or a bad file):
    every rank calls ``compute()`` (which may itself be collective: e.g. each rank computes a shard
    and all-gathers), the first rank of each node (``local_rank`` 0; default: rank 0 only) writes the
    file atomically, all ranks meet at ``barrier()``, and every rank loads its node's file (verifying
    the key), so all ranks train on identical numbers.

    ``cache_dir`` may be one folder every node shares or a node-local disk (the same path on each
    node): a node's first rank writes for its node, and on a shared folder the nodes' atomic writes
    of identical bytes replace each other harmlessly. The ranks must agree on hit or miss, or a
    collective ``compute`` would hang on the ranks that call it (with node-local folders one node
    may hold the file and another not); ``all_agree(local_hit) -> bool`` (an all-reduce MIN of the
    flag over every rank) makes that certain: a hit only where every rank found the file. If a
    writer cannot write the file, or a rank cannot read it back, that rank goes on with its own
    computed values and says so.
    """
    local_rank = _check_ranks(compute, rank, world_size, local_rank, barrier)
    parts = dict(parts)
    key = cache_key(**parts)
    path = cache_path(cache_dir, key)
    who = f" [rank {rank}]" if world_size > 1 else ""

    ref, reason = _read(path, key, parts)
    hit = ref is not None
    if world_size > 1 and all_agree is not None and not all_agree(hit):
        hit, reason = False, reason or "another rank could not load it"
    if hit:
        log(f"{PREFIX} cache hit {path} ({ref.summary()}){who}")
        return ref, True

    log(f"{PREFIX} cache miss {path} ({reason}); computing{who}")
    computed, elapsed = _compute_and_write(path, key, parts, compute, local_rank, world_size, barrier, log)
    loaded, why = _read(path, key, parts)
    if loaded is None:
        log(f"{PREFIX} could not read back {path} ({why}); using the values computed on this rank{who}")
        return computed, False
    writer = rank - local_rank  # the first rank of this node
    if local_rank != 0:
        _warn_if_different(loaded, computed, log, who, writer)
    verb = "wrote" if local_rank == 0 else f"loaded rank {writer}'s"
    log(f"{PREFIX} computed {computed.summary()} in {elapsed:.1f}s; {verb} {path}{who}")
    return loaded, False


def _check_ranks(compute, rank, world_size, local_rank, barrier) -> int:
    """get_or_build_ref_logprobs's arguments checked before any work; returns local_rank (default: rank)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if local_rank is None:
        local_rank = rank
    if not isinstance(local_rank, int) or not 0 <= local_rank <= rank:
        raise ValueError(f"local_rank must be an int in [0, rank={rank}], got {local_rank!r}")
    if world_size > 1 and barrier is None:
        raise ValueError(
            "barrier is required when world_size > 1 (the first rank of each node writes, the others wait for it)"
        )
    if not callable(compute):
        raise TypeError("compute must be a callable returning (logps, counts)")
    return local_rank


def _compute_and_write(path, key, parts, compute, local_rank, world_size, barrier, log) -> tuple[RefLogprobs, float]:
    """A miss: every rank computes, the node's first rank writes the file, all meet at the barrier.
    Returns (this rank's computed values, seconds the compute took)."""
    start = time.perf_counter()
    error: Exception | None = None
    computed = None
    try:
        computed = _normalize(compute(), key, parts)
    except (TypeError, ValueError) as e:
        error = e  # raised after the barrier, so the other ranks are not left waiting
    elapsed = time.perf_counter() - start
    if local_rank == 0 and computed is not None:
        try:
            save_ref_logprobs(path, computed)
        except Exception as e:
            log(f"{PREFIX} could not write {path} ({type(e).__name__}: {e}); using the computed values")
    if world_size > 1:
        barrier()
    if error is not None:
        raise error
    return computed, elapsed


def _warn_if_different(loaded: RefLogprobs, computed: RefLogprobs, log, who: str, writer: int) -> None:
    # All ranks should compute the same numbers; a difference means the compute was not gathered.
    for s in computed.sets:
        a, b = loaded.logps.get(s), computed.logps[s]
        if a is None or a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-3):
            log(
                f"{PREFIX} set {s!r} differs between rank {writer}'s file and this rank's compute(){who}; "
                f"using rank {writer}'s (is compute() gathering across ranks?)"
            )


def verify_ref_logprobs(
    ref: RefLogprobs,
    recompute: Callable[[str, Tensor], Tensor],
    *,
    sample: int = 8,
    seed: int = 0,
    atol: float = 1e-3,
    rtol: float = 1e-4,
) -> dict:
    """Recompute ``sample`` random examples of every set with ``recompute(set_name, indices) -> logps``
    and compare with the cache: |cached - recomputed| <= atol + rtol * |recomputed|.

    Returns ``{"ok": bool, "sets": {name: {"indices", "max_abs_diff", "worst_index", "ok"}}}`` and
    raises ValueError, naming the set and the index of the largest mismatch, if any example fails
    (the report is attached to the exception as ``.report``).
    The sample of each set depends only on ``seed`` and the set name.
    """
    if not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample must be an int >= 1, got {sample!r}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got {atol}, {rtol}")
    report: dict = {"ok": True, "sets": {}}
    worst: tuple[float, str, int, float, float] | None = None
    for s in ref.sets:
        n = ref.num_examples(s)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(s.encode()))
        idx = torch.randperm(n, generator=gen)[: min(sample, n)].sort().values
        entry = {"indices": idx.tolist(), "max_abs_diff": 0.0, "worst_index": None, "ok": True}
        report["sets"][s] = entry
        if not idx.numel():
            continue
        got = recompute(s, idx)
        got = torch.as_tensor(got).detach().to("cpu", torch.float32).reshape(-1)
        if got.shape != idx.shape:
            raise ValueError(f"recompute({s!r}, indices) returned {got.numel()} values for {idx.numel()} indices")
        cached = ref.logps[s][idx]
        diff = (cached - got).abs().nan_to_num(nan=float("inf"))
        bad = (diff > atol + rtol * got.abs()) | ~torch.isfinite(got)
        j = int(diff.argmax())
        entry.update(max_abs_diff=float(diff[j]), worst_index=int(idx[j]), ok=not bool(bad.any()))
        if not entry["ok"]:
            report["ok"] = False
            if worst is None or float(diff[j]) > worst[0]:
                worst = (float(diff[j]), s, int(idx[j]), float(cached[j]), float(got[j]))
    if worst is not None:
        d, s, i, c, g = worst
        failing = [name for name, e in report["sets"].items() if not e["ok"]]
        error = ValueError(
            f"reference log-probs do not match a recompute: set {s!r} index {i}: cached {c:.6g}, "
            f"recomputed {g:.6g} (|diff| {d:.3g} > atol {atol} + rtol {rtol}); failing sets: {failing}"
        )
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report
