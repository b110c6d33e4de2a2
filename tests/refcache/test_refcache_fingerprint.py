"""Reference log-prob cache keys: fingerprints of the model, tokenizer, examples and config."""

import pytest
import torch
from refcache_helpers import TEXTS, TinyLM, make_examples

from fastnpo.refcache import (
    cache_key,
    fingerprint,
    fingerprint_config,
    fingerprint_examples,
    fingerprint_model,
    fingerprint_tokenizer,
    ref_cache_parts,
)
from fastnpo.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


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
