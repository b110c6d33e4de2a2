"""A tiny, fully offline setup: Mini-TOFU data, an in-code tokenizer, a random tiny Llama.

`fastnpo prepare-tiny --out DIR` writes DIR/data/<split>.jsonl, DIR/base (a Hugging Face
model folder with its tokenizer). configs/tiny_cpu.yaml trains on it; the demo and the tests
build the same thing, so nothing is ever downloaded.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .minitofu import generate_minitofu, minitofu_tokenizer, write_minitofu


@dataclass
class TinyModelSpec:
    """A ~0.1-1M parameter Llama: small enough for 2 CPU cores, big enough to memorise Mini-TOFU."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    vocab_size: int = 1024  # of the BPE tokenizer: large enough that every surname is one token


def build_tiny_model(tokenizer, spec: TinyModelSpec, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def prepare_tiny(
    out_dir,
    *,
    seed: int = 0,
    num_authors: int = 100,
    qa_per_author: int = 4,
    spec: TinyModelSpec | None = None,
) -> dict[str, Path]:
    """Write data and a random tiny model with its tokenizer; returns their paths."""
    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    data_dir = write_minitofu(out / "data", seed=seed, num_authors=num_authors, qa_per_author=qa_per_author)
    tokenizer = minitofu_tokenizer(
        generate_minitofu(seed, num_authors, qa_per_author), vocab_size=spec.vocab_size
    )
    model = build_tiny_model(tokenizer, spec, seed)
    base = out / "base"
    model.save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    return {"data": data_dir, "base": base}
