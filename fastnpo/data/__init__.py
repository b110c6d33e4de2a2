"""TOFU-schema data for unlearning: loading, prompt templates, answer-only labels, batching, packing.

Every example is ``prompt + answer`` with labels = input ids on answer tokens and -100 elsewhere
(Hugging Face convention; the model shifts). Each item keeps ``index``, its row number in the
source split, which is the key into the reference log-prob cache: whatever order batches come
in, a per-example cached value can always be looked up.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

from .alternates import ALTERNATE_COLUMN, add_alternate_answers, alternate_prompts, make_alternates
from .batching import PairedBatches, collate, collate_packed, length_grouped_batches
from .config import DataConfig, check_template
from .sources import DEFAULT_IDK_ANSWERS, add_idk_answers, describe_source, idk_answers, load_qa_split
from .tokenize import QADataset, _check_tokenizer, encode_prompt, encode_qa, tokenize_split

__all__ = [
    "ALTERNATE_COLUMN",
    "DEFAULT_IDK_ANSWERS",
    "DataConfig",
    "PairedBatches",
    "QADataset",
    "UnlearningData",
    "add_alternate_answers",
    "add_idk_answers",
    "alternate_prompts",
    "build_unlearning_data",
    "check_template",
    "collate",
    "collate_packed",
    "encode_prompt",
    "encode_qa",
    "idk_answers",
    "length_grouped_batches",
    "load_qa_split",
    "make_alternates",
    "tokenize_split",
]


class UnlearningData(NamedTuple):
    forget: QADataset
    retain: QADataset | None
    idk: QADataset | None
    batches: PairedBatches
    alternate: QADataset | None = None


def _warn_repeated_questions(questions: list[str], name: str) -> None:
    """One warning with the count when questions repeat (each repeat is unlearned again, and a
    set of copies of one question is rarely what was meant)."""
    distinct = len(set(questions))
    if distinct < len(questions):
        warnings.warn(
            f"{name}: {len(questions) - distinct} of {len(questions)} examples repeat a question asked "
            f"earlier in the set ({distinct} distinct questions)",
            stacklevel=3,
        )


def build_unlearning_data(
    config: DataConfig, tokenizer, *, idk: bool = False, alternate: bool = False
) -> UnlearningData:
    """Load, tokenise and pair the sets named by config. idk=True adds the IdkDPO refusals,
    alternate=True the forget questions' alternate answers (data.alternate, alternates.py).

    The caller collates each step's items (collate / collate_packed with its pad id).
    """
    if not isinstance(config, DataConfig):
        raise ValueError(f"config must be a DataConfig, got {type(config).__name__}")
    if not config.forget:
        raise ValueError("DataConfig.forget is empty: name a forget set (file, directory or hub dataset)")
    _check_tokenizer(tokenizer, config.template)
    # Fail before loading anything: a tokenizer with neither could never be padded by the
    # caller (modeling.load_tokenizer falls back to eos when pad is missing).
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither pad_token nor eos_token to pad with")
    answers = idk_answers(config) if idk else None
    forget_raw = load_qa_split(config.forget, config.forget_split, what="forget set")
    retain_raw = None
    if config.retain:
        retain_raw = load_qa_split(config.retain, config.retain_split, what="retain set")
    forget_name = describe_source(config.forget, config.forget_split, what="forget set")
    _warn_repeated_questions(forget_raw["question"], forget_name)
    forget = tokenize_split(forget_raw, tokenizer, config, what=forget_name)
    retain = None
    if retain_raw is not None:
        retain_name = describe_source(config.retain, config.retain_split, what="retain set")
        retain = tokenize_split(retain_raw, tokenizer, config, what=retain_name)
    idk_set = None
    if answers is not None:
        with_idk = add_idk_answers(forget_raw, answers, seed=config.seed)
        idk_set = tokenize_split(with_idk, tokenizer, config, answer_column="idk_answer", what=f"{forget_name} (idk)")
    alternate_set = None
    if alternate:
        with_alternates = add_alternate_answers(forget_raw, config, what=forget_name)
        alternate_set = tokenize_split(
            with_alternates, tokenizer, config, answer_column=ALTERNATE_COLUMN, what=f"{forget_name} (alternate)"
        )
    batches = PairedBatches(
        forget,
        retain,
        batch_size=config.batch_size,
        retain_batch_size=config.retain_batch_size,
        seed=config.seed,
        idk=idk_set,
        alternate=alternate_set,
    )
    return UnlearningData(forget, retain, idk_set, batches, alternate_set)
