"""Shared by the refcache tests: a tiny model with buffers, a counting compute callback, example
and cache-key builders. (A plain module, not conftest: pytest imports tests/refcache by path.)"""

import struct

import torch
from torch import nn

from fastnpo.refcache import get_or_build_ref_logprobs, ref_cache_parts

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


def header_len(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]
