"""Reference log-prob cache: fingerprints, keys, file validation, atomic writes, ranks, verification."""

import json
import os
import struct
import threading

import pytest
import torch
from torch import nn

from fastnpo import refcache
from fastnpo.refcache import (
    RefLogprobs,
    cache_key,
    cache_path,
    fingerprint,
    fingerprint_config,
    fingerprint_examples,
    fingerprint_model,
    fingerprint_tokenizer,
    get_or_build_ref_logprobs,
    load_ref_logprobs,
    ref_cache_parts,
    save_ref_logprobs,
    store,
    verify_ref_logprobs,
)
from fastnpo.tiny import build_tokenizer

TEXTS = ["the author wrote a novel about the sea", "who wrote the book? an author from paris"] * 4
SIZES = {"forget": 40, "retain": 300}


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many causal LMs
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))
        self.register_buffer(
            "inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), persistent=False
        )


def true_logps(set_name: str, index: torch.Tensor) -> torch.Tensor:
    # A deterministic stand-in for "the reference model's summed log-prob of example `index`".
    offset = 0.0 if set_name == "forget" else 1000.0
    return -(index.double() * 0.37 + 3.0 + offset).sin().abs().float() * 50


class Compute:
    """Counting compute callback."""

    def __init__(self, sizes=SIZES, shift=0.0):
        self.calls = 0
        self.sizes, self.shift = sizes, shift

    def __call__(self):
        self.calls += 1
        logps = {s: true_logps(s, torch.arange(n)) + self.shift for s, n in self.sizes.items()}
        counts = {s: torch.arange(n) % 17 + 1 for s, n in self.sizes.items()}
        return logps, counts


def make_examples(tok, n, max_length=16, start=0):
    items = []
    for i in range(n):
        ids = tok(f"question {i}? answer {i * 7}")["input_ids"][:max_length]
        labels = [-100] * 3 + ids[3:]
        items.append({"index": start + i, "input_ids": ids, "labels": labels})
    return items


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


def base_parts(model, tok, examples, **overrides):
    extra = {"template": "[INST] {q} [/INST] {a}", "max_length": 16, "dtype": torch.float32}
    extra.update(overrides)
    return ref_cache_parts(model=model, tokenizer=tok, examples=examples, **extra)


def build(tmp_path, parts, compute, logs=None, **kw):
    logs = [] if logs is None else logs
    return get_or_build_ref_logprobs(tmp_path, parts, compute, log=logs.append, **kw)


def simple_parts(**over):
    parts = {
        "model": "m" * 64,
        "tokenizer": "t" * 64,
        "examples/forget": "f",
        "examples/retain": "r",
        "max_length": "16",
        "dtype": "torch.float32",
    }
    parts.update(over)
    return parts


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_model_deterministic_and_sensitive():
    model = TinyLM()
    fp = fingerprint_model(model)
    assert fp == fingerprint_model(model) and len(fp) == 64
    assert fingerprint_model(model, workers=1) == fingerprint_model(model, workers=4)
    with torch.no_grad():
        model.norm.weight[3] += 1e-3
    assert fingerprint_model(model) != fp


@pytest.mark.parametrize("which", ["scale", "inv_freq"])
def test_fingerprint_model_covers_buffers(which):
    model = TinyLM()
    fp = fingerprint_model(model)
    with torch.no_grad():
        getattr(model, which)[0] += 1.0
    assert fingerprint_model(model) != fp


def test_fingerprint_model_bf16_and_chunking(monkeypatch):
    model = TinyLM().to(torch.bfloat16)
    fp = fingerprint_model(model)
    assert fp == fingerprint_model(model)
    assert fp != fingerprint_model(TinyLM().to(torch.bfloat16))  # other random weights
    monkeypatch.setattr(fingerprint, "_CHUNK_BYTES", 10)  # many tiny device->host pieces: same bytes, same hash
    assert fingerprint_model(model) == fp
    monkeypatch.undo()
    with torch.no_grad():
        model.embed.weight[5, 7] = model.embed.weight[5, 7] * 2 + 1
    assert fingerprint_model(model) != fp
    # Same values in another dtype are another model.
    assert fingerprint_model(TinyLM().float()) != fingerprint_model(TinyLM().double())


def test_fingerprint_model_meta_rejected():
    model = TinyLM().to("meta")
    with pytest.raises(ValueError, match="meta"):
        fingerprint_model(model)


def test_fingerprint_tokenizer(tokenizer):
    fp = fingerprint_tokenizer(tokenizer)
    # Encoding with truncation/padding leaves state in the backend tokenizer; it must not matter.
    tokenizer(["a b c d e f"], truncation=True, max_length=3, padding="max_length")
    assert fingerprint_tokenizer(tokenizer) == fp
    other = build_tokenizer(TEXTS, vocab_size=300)
    assert fingerprint_tokenizer(other) == fp
    other.add_tokens(["<new>"])
    assert fingerprint_tokenizer(other) != fp
    templated = build_tokenizer(TEXTS, vocab_size=300)
    templated.chat_template = "{{ messages }}"
    assert fingerprint_tokenizer(templated) != fp
    assert fingerprint_tokenizer(build_tokenizer(TEXTS, vocab_size=290)) != fp


def test_fingerprint_examples(tokenizer):
    items = make_examples(tokenizer, 5)
    fp = fingerprint_examples(items)
    assert fingerprint_examples(items[::-1]) == fp  # indexed by "index", not by position
    as_tensors = [
        {**it, "input_ids": torch.tensor(it["input_ids"]), "labels": torch.tensor(it["labels"])}
        for it in items
    ]
    assert fingerprint_examples(as_tensors) == fp
    changed = [dict(it) for it in items]
    changed[2]["input_ids"] = [*items[2]["input_ids"][:-1], items[2]["input_ids"][-1] + 1]
    assert fingerprint_examples(changed) != fp
    relabeled = [dict(it) for it in items]
    relabeled[0]["labels"] = [-100, *items[0]["labels"][1:]]
    relabeled[0]["labels"][3] = -100
    assert fingerprint_examples(relabeled) != fp
    with pytest.raises(ValueError, match="twice"):
        fingerprint_examples([*items, items[0]])
    with pytest.raises(ValueError, match="labels"):
        fingerprint_examples([{"index": 0, "input_ids": [1]}])
    with pytest.raises(TypeError, match="index"):
        fingerprint_examples([{"index": 1.5, "input_ids": [1], "labels": [1]}])
    with pytest.raises(TypeError, match="integers"):
        fingerprint_examples([{"index": 0, "input_ids": [1.0], "labels": [1]}])
    assert fingerprint_examples([{**items[0], "index": torch.tensor(0)}]) == fingerprint_examples(items[:1])


def test_fingerprint_config():
    from transformers import PretrainedConfig  # the model classes' configs take seconds to import

    cfg = PretrainedConfig(vocab_size=64, hidden_size=16, rms_norm_eps=1e-6, rope_theta=10000.0)
    fp = fingerprint_config(cfg)
    assert fingerprint_config(cfg.to_dict()) == fp
    cfg._name_or_path = "/somewhere/else"
    cfg.output_hidden_states = True
    assert fingerprint_config(cfg) == fp
    cfg.rms_norm_eps = 1e-5
    assert fingerprint_config(cfg) != fp
    model = TinyLM()
    model.config = cfg
    assert fingerprint_config(model) == fingerprint_config(cfg)
    assert "config" in ref_cache_parts(model=model, examples={"forget": []})
    with pytest.raises(ValueError, match="config"):
        fingerprint_config(TinyLM())


def test_cache_key():
    assert cache_key(a="1", b="2") == cache_key(b="2", a="1")
    assert cache_key(a="1", b="2") != cache_key(a="1", b="3")
    assert cache_key(a="12") != cache_key(a="1", b="2")
    assert cache_key(**{"examples/forget": "x"}) != cache_key(**{"examples/retain": "x"})
    with pytest.raises(TypeError, match="max_length"):
        cache_key(max_length=16)
    with pytest.raises(ValueError):
        cache_key()


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


def _header_len(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("where", ["payload", "middle", "header"])
def test_recovers_from_flipped_byte(tmp_path, where):
    parts = simple_parts()
    build(tmp_path, parts, Compute())
    path = cache_path(tmp_path, cache_key(**parts))
    data = bytearray(path.read_bytes())
    n = _header_len(path)
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
    n = _header_len(path)
    header = json.loads(path.read_bytes()[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert sorted(header) == ["forget/counts", "forget/logps", "retain/counts", "retain/logps"]
    assert header["forget/logps"]["dtype"] == "F32" and header["forget/counts"]["dtype"] == "I64"
    assert meta["key"] == ref.key and json.loads(meta["parts"]) == parts
    assert meta["format_version"] == refcache.FORMAT_VERSION and len(meta["checksum"]) == 64


def test_fingerprint_model_fsdp2_sharded_matches_unsharded(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.fsdp import fully_shard

    model = TinyLM()
    fp = fingerprint_model(model)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        fully_shard(model.norm)
        fully_shard(model)
        assert type(model.embed.weight).__name__ == "DTensor" and model.head.weight is model.embed.weight
        assert fingerprint_model(model) == fp  # gathered per parameter; the tied weight hashed once
    finally:
        dist.destroy_process_group()
