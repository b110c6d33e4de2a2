"""Tiny offline models: a byte-level BPE tokenizer trained in code on given texts and a random
tiny Llama, so that the demo, U2A's synthetic task, the tests and the benchmarks never download
anything. (Mini-TOFU's data and `fastnpo prepare-tiny` are in fastnpo.tofu.minitofu.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")
# Byte-level BPE needs all 256 bytes plus the specials before a single merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
PROMPT_MARKERS = ("[INST]", "[/INST]")


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on texts; lossless on any string, adds no special tokens by itself.

    extra_tokens (e.g. prompt markers) are kept whole, as ordinary tokens, within vocab_size.
    Nothing is added on encode (no automatic <bos>): callers build ``<bos> prompt answer <eos>``
    themselves, which keeps prompt/answer token boundaries explicit for answer-only losses.
    """
    # Imported here so that generating data needs the standard library only (and starts in ms).
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra_tokens = list(dict.fromkeys(extra_tokens))
    least = MIN_VOCAB_SIZE + len(extra_tokens)
    if not isinstance(vocab_size, int) or vocab_size < least:
        raise ValueError(f"vocab_size must be an int >= {least}, got {vocab_size!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts must contain at least one string")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(extra_tokens),
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet keeps unseen characters encodable (no <unk> ever produced).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Not special: decode(skip_special_tokens=True) must keep the prompt markers.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        # The default clean-up rewrites " ." to "." on decode, which breaks exact round trips.
        clean_up_tokenization_spaces=False,
    )


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
