"""Reference log-prob cache: hit / miss, file validation, atomic writes, ranks, lookup and verification."""

import json
import os
import struct
import threading

import pytest
import torch
from refcache_helpers import (
    SIZES,
    TEXTS,
    Compute,
    TinyLM,
    base_parts,
    build,
    header_len,
    make_examples,
    simple_parts,
    true_logps,
)

from fastnpo import refcache
from fastnpo.refcache import (
    RefLogprobs,
    cache_key,
    cache_path,
    get_or_build_ref_logprobs,
    load_ref_logprobs,
    save_ref_logprobs,
    store,
    verify_ref_logprobs,
)
from fastnpo.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


# ---------------------------------------------------------------- hit / miss


def test_hit_on_second_call(tmp_path, tokenizer):
    model = TinyLM()
    examples = {"forget": make_examples(tokenizer, 40), "retain": make_examples(tokenizer, 300, start=0)}
    parts = base_parts(model, tokenizer, examples)
    compute, logs = Compute(), []
    first, hit1 = build(tmp_path, parts, compute, logs)
    second, hit2 = build(tmp_path, parts, compute, logs)
    assert (hit1, hit2) == (False, True) and compute.calls == 1
    assert any("cache miss" in m and "missing" in m for m in logs)
    assert any(
        m.startswith(f"reference log-probs: cache hit {cache_path(tmp_path, first.key)}") for m in logs
    )
    assert first.parts == second.parts == parts and first.key == second.key == cache_key(**parts)
    for s, n in SIZES.items():
        assert second.logps[s].dtype == torch.float32 and second.counts[s].dtype == torch.int64
        assert second.logps[s].shape == (n,)
        torch.testing.assert_close(second.logps[s], true_logps(s, torch.arange(n)), rtol=0, atol=0)
        torch.testing.assert_close(second.counts[s], first.counts[s], rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == [f"ref-logprobs-{first.key[:16]}.safetensors"]


def _change_weights(model, tok, ex):
    with torch.no_grad():
        model.embed.weight[1, 2] += 0.5
    return base_parts(model, tok, ex)


def _change_tokenizer(model, tok, ex):
    other = build_tokenizer(TEXTS, vocab_size=300)
    other.add_tokens(["<extra>"])
    return base_parts(model, other, ex)


def _change_one_token(model, tok, ex):
    forget = [dict(it) for it in ex["forget"]]
    forget[7]["input_ids"] = [*forget[7]["input_ids"][:-1], forget[7]["input_ids"][-1] + 1]
    return base_parts(model, tok, {**ex, "forget": forget})


CHANGES = {
    "model": _change_weights,
    "tokenizer": _change_tokenizer,
    "examples/forget": _change_one_token,
    "max_length": lambda m, t, ex: base_parts(m, t, ex, max_length=17),
    "dtype": lambda m, t, ex: base_parts(m, t, ex, dtype=torch.bfloat16),
    "template": lambda m, t, ex: base_parts(m, t, ex, template="<s>{q}\n{a}"),
}


@pytest.mark.parametrize("part", sorted(CHANGES))
def test_miss_on_any_changed_part(tmp_path, tokenizer, part):
    model = TinyLM()
    examples = {"forget": make_examples(tokenizer, 10), "retain": make_examples(tokenizer, 12)}
    parts = base_parts(model, tokenizer, examples)
    compute = Compute({"forget": 10, "retain": 12})
    build(tmp_path, parts, compute)
    changed = CHANGES[part](model, tokenizer, examples)
    assert [k for k in parts if parts[k] != changed[k]] == [part]
    logs = []
    _, hit = build(tmp_path, changed, compute, logs)
    assert not hit and compute.calls == 2
    # The old file, read with the new key, is rejected naming exactly the part that changed.
    reasons = []
    old = cache_path(tmp_path, cache_key(**parts))
    assert load_ref_logprobs(old, cache_key(**changed), expected_parts=changed, log=reasons.append) is None
    assert "key mismatch" in reasons[0] and f"{part} (cached" in reasons[0]
    assert reasons[0].count("(cached") == 1
    _, hit = build(tmp_path, changed, compute)
    assert hit and compute.calls == 2


# ---------------------------------------------------------------- bad files are recomputed


def _recovers(tmp_path, parts, expect_reason):
    compute, logs = Compute(), []
    ref, hit = build(tmp_path, parts, compute, logs)
    assert not hit and compute.calls == 1
    miss = next(m for m in logs if "cache miss" in m)
    assert expect_reason in miss, miss
    torch.testing.assert_close(ref.logps["forget"], true_logps("forget", torch.arange(40)), rtol=0, atol=0)
    _, hit = build(tmp_path, parts, compute)
    assert hit and compute.calls == 1
    return miss


def test_recovers_from_truncated_file(tmp_path):
    parts = simple_parts()
    build(tmp_path, parts, Compute())
    path = cache_path(tmp_path, cache_key(**parts))
    data = path.read_bytes()
    for size in (len(data) - 1, len(data) // 2, 5, 0):
        path.write_bytes(data[:size])
        _recovers(tmp_path, parts, "truncated")


@pytest.mark.parametrize("where", ["payload", "middle", "header"])
def test_recovers_from_flipped_byte(tmp_path, where):
    parts = simple_parts()
    build(tmp_path, parts, Compute())
    path = cache_path(tmp_path, cache_key(**parts))
    data = bytearray(path.read_bytes())
    n = header_len(path)
    pos = {"payload": 8 + n + (len(data) - 8 - n) // 2, "middle": len(data) // 2, "header": 8 + n // 2}[where]
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    reason = _recovers(tmp_path, parts, "")
    if where != "header":
        assert "checksum mismatch" in reason
    else:
        assert any(w in reason for w in ("corrupt", "key mismatch", "checksum", "format")), reason
    assert store._read(path, cache_key(**parts), parts)[0] is not None  # rewritten


def test_recovers_from_other_key_under_the_same_name(tmp_path):
    parts, other = simple_parts(), simple_parts(max_length="32")
    stale = RefLogprobs(*Compute(shift=5.0)(), key=cache_key(**other), parts=other)
    save_ref_logprobs(cache_path(tmp_path, cache_key(**parts)), stale)
    reason = _recovers(tmp_path, parts, "key mismatch")
    assert "max_length (cached 32, now 16)" in reason


def test_recovers_from_nan(tmp_path):
    parts = simple_parts()
    logps, counts = Compute()()
    logps["retain"][17] = float("nan")
    tensors = {**{f"{s}/logps": v for s, v in logps.items()}, **{f"{s}/counts": v for s, v in counts.items()}}
    path = cache_path(tmp_path, cache_key(**parts))
    path.write_bytes(store._serialize(tensors, cache_key(**parts), parts))
    reason = _recovers(tmp_path, parts, "NaN")
    assert "'retain'" in reason and "index 17" in reason


def test_rejects_other_format_version(tmp_path, monkeypatch):
    parts = simple_parts()
    ref = RefLogprobs(*Compute()(), key=cache_key(**parts), parts=parts)
    path = cache_path(tmp_path, ref.key)
    monkeypatch.setattr(store, "FORMAT_VERSION", "0")
    save_ref_logprobs(path, ref)
    monkeypatch.undo()
    reasons = []
    assert load_ref_logprobs(path, ref.key, log=reasons.append) is None
    assert "format version '0'" in reasons[0]
    _recovers(tmp_path, parts, "format version")


def test_load_reports_missing_and_garbage(tmp_path, caplog):
    key = cache_key(**simple_parts())
    with caplog.at_level("INFO", logger="fastnpo.refcache"):
        assert load_ref_logprobs(tmp_path / "nope.safetensors", key) is None
    assert "missing" in caplog.text
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"x" * 50)
    with caplog.at_level("WARNING", logger="fastnpo.refcache"):
        assert load_ref_logprobs(garbage, key) is None
    assert "corrupt header" in caplog.text
    tampered = tmp_path / "tampered.safetensors"
    parts = simple_parts()
    ref = RefLogprobs(*Compute()(), key=key, parts=parts)
    data = store._serialize(
        {"forget/logps": ref.logps["forget"], "forget/counts": ref.counts["forget"]},
        key,
        {**parts, "dtype": "other"},
    )  # parts that do not hash to the key
    tampered.write_bytes(data)
    reasons = []
    assert load_ref_logprobs(tampered, key, log=reasons.append) is None
    assert "do not hash to the stored key" in reasons[0]


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temp_file(tmp_path):
    parts = simple_parts()
    ref = RefLogprobs(*Compute()(), key=cache_key(**parts), parts=parts)
    path = save_ref_logprobs(tmp_path / "sub" / "ref.safetensors", ref)
    assert os.listdir(path.parent) == ["ref.safetensors"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    loaded = load_ref_logprobs(path, ref.key)
    assert loaded is not None and loaded.sets == ("forget", "retain")


def test_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    parts = simple_parts()
    old = RefLogprobs(*Compute()(), key=cache_key(**parts), parts=parts)
    path = save_ref_logprobs(tmp_path / "ref.safetensors", old)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    new = RefLogprobs(*Compute(shift=1.0)(), key=old.key, parts=parts)
    with pytest.raises(OSError, match="disk on fire"):
        save_ref_logprobs(path, new)
    assert os.listdir(tmp_path) == ["ref.safetensors"] and path.read_bytes() == before
    monkeypatch.undo()
    loaded = load_ref_logprobs(path, old.key)
    torch.testing.assert_close(loaded.logps["retain"], old.logps["retain"], rtol=0, atol=0)


def test_unwritable_cache_still_returns_values(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("read-only")))
    logs = []
    ref, hit = build(tmp_path, simple_parts(), Compute(), logs)
    assert not hit and os.listdir(tmp_path) == []
    assert any("could not write" in m for m in logs)
    torch.testing.assert_close(ref.logps["forget"], true_logps("forget", torch.arange(40)), rtol=0, atol=0)


def test_save_rejects_inconsistent_key(tmp_path):
    ref = RefLogprobs(*Compute()(), key="0" * 64, parts=simple_parts())
    with pytest.raises(ValueError, match="cache_key"):
        save_ref_logprobs(tmp_path / "x.safetensors", ref)


def test_bad_compute_output_is_not_cached(tmp_path):
    def nan_compute():
        logps, counts = Compute()()
        logps["forget"][3] = float("nan")
        return logps, counts

    with pytest.raises(ValueError, match=r"compute\(\).*'forget'.*NaN"):
        build(tmp_path, simple_parts(), nan_compute)
    with pytest.raises(TypeError, match="counts"):
        build(tmp_path, simple_parts(), lambda: ({"a": torch.zeros(2)}, {"a": torch.zeros(2)}))
    with pytest.raises(ValueError, match="sets"):
        build(
            tmp_path, simple_parts(), lambda: ({"a": torch.zeros(2)}, {"b": torch.zeros(2, dtype=torch.long)})
        )
    with pytest.raises(ValueError, match=r"sets \['forget', 'retain'\] but parts .* \['forget'\]"):
        build(tmp_path, {"examples/forget": "f", "model": "m"}, Compute())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- ranks


def test_two_ranks_with_threads(tmp_path, monkeypatch):
    writers = []
    real_write = store.atomic_write

    def recording_write(path, data):
        writers.append(threading.current_thread().name)
        real_write(path, data)

    monkeypatch.setattr(store, "atomic_write", recording_write)
    parts = simple_parts()
    barrier = threading.Barrier(2, timeout=10)
    computes = [Compute(), Compute()]
    results, errors, logs = {}, [], {0: [], 1: []}

    def run(rank):
        try:
            results[rank] = get_or_build_ref_logprobs(
                tmp_path,
                parts,
                computes[rank],
                rank=rank,
                world_size=2,
                barrier=barrier.wait,
                log=logs[rank].append,
            )
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not errors, errors
    assert writers == ["rank0"]  # written once, by rank 0; rank 1 never writes
    assert [c.calls for c in computes] == [1, 1]
    assert results[0][1] and results[1][1]  # second round: both hit
    assert any("[rank 1]" in m and "loaded rank 0's" in m for m in logs[1])
    torch.testing.assert_close(results[0][0].logps["retain"], results[1][0].logps["retain"], rtol=0, atol=0)


def test_rank1_waits_for_rank0_and_never_writes(tmp_path, monkeypatch):
    parts = simple_parts()
    key = cache_key(**parts)
    rank0 = RefLogprobs(*Compute()(), key=key, parts=parts)
    written_by_rank0 = save_ref_logprobs(tmp_path / "elsewhere" / "ref.safetensors", rank0).read_bytes()
    barrier_calls = []

    def barrier():  # "rank 0" writes while rank 1 waits at the barrier
        barrier_calls.append(1)
        cache_path(tmp_path, key).write_bytes(written_by_rank0)

    def no_write(path, data):
        raise AssertionError("rank 1 wrote the cache")

    # Rank 1's own compute disagrees: rank 0's file wins, with a warning.
    compute, logs = Compute(shift=0.5), []
    monkeypatch.setattr(store, "atomic_write", no_write)
    monkeypatch.setattr(refcache, "save_ref_logprobs", lambda p, r: pytest.fail("rank 1 saved"))
    ref, hit = build(tmp_path, parts, compute, logs, rank=1, world_size=2, barrier=barrier)
    monkeypatch.undo()
    assert not hit and barrier_calls == [1] and compute.calls == 1
    torch.testing.assert_close(ref.logps["forget"], rank0.logps["forget"], rtol=0, atol=0)
    assert any("differs between rank 0's file" in m for m in logs)
    # Now the file exists: rank 1 hits without computing and without a barrier.
    ref, hit = build(tmp_path, parts, compute, rank=1, world_size=2, barrier=lambda: pytest.fail("barrier"))
    assert hit and compute.calls == 1


def test_all_agree_forces_a_common_miss(tmp_path):
    parts = simple_parts()
    build(tmp_path, parts, Compute())
    compute = Compute()
    _, hit = build(tmp_path, parts, compute, world_size=2, barrier=lambda: None, all_agree=lambda h: False)
    assert not hit and compute.calls == 1


def test_rank_arguments_checked(tmp_path):
    with pytest.raises(ValueError, match="barrier"):
        build(tmp_path, simple_parts(), Compute(), rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        build(tmp_path, simple_parts(), Compute(), rank=2, world_size=2, barrier=lambda: None)


# ---------------------------------------------------------------- lookup and verify


def test_lookup():
    parts = simple_parts()
    ref = RefLogprobs(*Compute()(), key=cache_key(**parts), parts=parts)
    idx = torch.tensor([[3, 0], [39, 12]])
    logps, counts = ref.lookup("forget", idx)
    assert (
        logps.shape == counts.shape == (2, 2) and logps.dtype == torch.float32 and counts.dtype == torch.int64
    )
    torch.testing.assert_close(logps, true_logps("forget", idx), rtol=0, atol=0)
    torch.testing.assert_close(counts, idx % 17 + 1, rtol=0, atol=0)
    assert ref.lookup("retain", [299])[0].shape == (1,)
    with pytest.raises(KeyError, match=r"unknown set 'idk'.*forget, retain"):
        ref.lookup("idk", idx)
    with pytest.raises(IndexError, match=r"index 40 out of range for set 'forget' with 40 examples"):
        ref.lookup("forget", torch.tensor([0, 40]))
    with pytest.raises(IndexError, match="index -1"):
        ref.lookup("forget", torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        ref.lookup("forget", torch.tensor([1.0]))


def test_refl_logprobs_validates():
    with pytest.raises(ValueError, match="float32"):
        RefLogprobs({"a": torch.zeros(2, dtype=torch.float64)}, {"a": torch.zeros(2, dtype=torch.long)}, "k")
    with pytest.raises(ValueError, match="counts"):
        RefLogprobs({"a": torch.zeros(2)}, {"a": torch.zeros(3, dtype=torch.long)}, "k")


def test_verify():
    parts = simple_parts()
    ref = RefLogprobs(*Compute()(), key=cache_key(**parts), parts=parts)
    seen = {}

    def recompute(s, idx):
        seen[s] = idx.tolist()
        return true_logps(s, idx).double() + 1e-5

    report = verify_ref_logprobs(ref, recompute, sample=8, seed=3)
    assert report["ok"] and set(report["sets"]) == {"forget", "retain"}
    assert all(len(v) == 8 and len(set(v)) == 8 for v in seen.values())
    assert report["sets"]["retain"]["indices"] == seen["retain"]
    assert 0 < report["sets"]["forget"]["max_abs_diff"] < 1e-3
    assert verify_ref_logprobs(ref, recompute, sample=8, seed=3) == report  # reproducible

    target = report["sets"]["retain"]["indices"][5]

    def wrong(s, idx):
        out = true_logps(s, idx)
        out[(idx == target) & torch.tensor(s == "retain")] += 0.5
        out[(idx == report["sets"]["forget"]["indices"][0]) & torch.tensor(s == "forget")] += 0.01
        return out

    with pytest.raises(
        ValueError, match=rf"set 'retain' index {target}:.*failing sets: \['forget', 'retain'\]"
    ) as e:
        verify_ref_logprobs(ref, wrong, sample=8, seed=3)
    assert not e.value.report["ok"] and e.value.report["sets"]["retain"]["worst_index"] == target
    with pytest.raises(ValueError, match=r"recomputed nan"):
        verify_ref_logprobs(ref, lambda s, idx: torch.full(idx.shape, float("nan")), sample=2)
    with pytest.raises(ValueError, match="returned 1 values for 8"):
        verify_ref_logprobs(ref, lambda s, idx: torch.zeros(1))


def test_file_layout(tmp_path):
    parts = simple_parts()
    ref, _ = build(tmp_path, parts, Compute())
    path = cache_path(tmp_path, ref.key)
    n = header_len(path)
    header = json.loads(path.read_bytes()[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert sorted(header) == ["forget/counts", "forget/logps", "retain/counts", "retain/logps"]
    assert header["forget/logps"]["dtype"] == "F32" and header["forget/counts"]["dtype"] == "I64"
    assert meta["key"] == ref.key and json.loads(meta["parts"]) == parts
    assert meta["format_version"] == refcache.FORMAT_VERSION and len(meta["checksum"]) == 64
