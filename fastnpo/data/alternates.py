"""Alternate answers (the "alternate" set of alternate preference optimization): a plausible
answer to each forget question that changes its facts.

Read from a table with ``question`` and ``alternate`` columns (data.alternate; the layout of
open-unlearning's generate.py output for alternate preference optimization, whose extra columns
are ignored) or
from the forget set's own ``alternate`` column; written by `make_alternates` from the model's own
greedy answers to a prompt that shows it the question and the original answer. The data layer
holds no model: the caller passes the generator (docs/methods.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .config import DataConfig
from .sources import describe_source, load_qa_split, load_table
from .tokenize import encode_prompt

ALTERNATE_COLUMN = "alternate"

# What the model is asked, with the run's template around it (data.template).
ALTERNATE_INSTRUCTION = (
    "Question: {question}\nAnswer: {answer}\n"
    "Give a different answer to this question that sounds just as plausible but changes every fact "
    "the answer states.\nAlternate answer:"
)


def add_alternate_answers(forget, config: DataConfig, *, what: str = "forget set"):
    """The forget rows with an ``alternate`` column: the forget set's own, or (data.alternate) the
    first alternate of each question in that table. Every forget question needs one."""
    if not config.alternate:
        if ALTERNATE_COLUMN not in forget.column_names:
            raise ValueError(
                f"{what} has no {ALTERNATE_COLUMN!r} column and data.alternate is empty: name a table of "
                f"alternate answers (fastnpo.data.make_alternates writes one); columns: {forget.column_names}"
            )
        return forget
    name = describe_source(config.alternate, config.forget_split, what="data.alternate")
    table = load_table(config.alternate, config.forget_split, what="data.alternate")
    for column in ("question", ALTERNATE_COLUMN):
        if column not in table.column_names:
            raise ValueError(f"{name} has no {column!r} column; columns: {table.column_names}")
    by_question: dict[str, str] = {}
    for question, alternate in zip(table["question"], table[ALTERNATE_COLUMN], strict=True):
        if isinstance(alternate, str) and alternate.strip():
            by_question.setdefault(question, alternate)
    missing = [q for q in forget["question"] if q not in by_question]
    if missing:
        raise ValueError(
            f"{name}: no non-empty alternate answer for {len(missing)} of {len(forget)} forget questions "
            f"(the first: {missing[0]!r})"
        )
    if ALTERNATE_COLUMN in forget.column_names:
        forget = forget.remove_columns(ALTERNATE_COLUMN)
    return forget.add_column(ALTERNATE_COLUMN, [by_question[q] for q in forget["question"]])


def alternate_prompts(questions: list[str], answers: list[str], tokenizer, template: str) -> list[list[int]]:
    """The token ids the generator continues: ALTERNATE_INSTRUCTION in the run's template."""
    return [
        encode_prompt(tokenizer, ALTERNATE_INSTRUCTION.format(question=q, answer=a), template=template)
        for q, a in zip(questions, answers, strict=True)
    ]


def make_alternates(
    config: DataConfig, tokenizer, generate: Callable[[list[list[int]]], list[str]], out: str | Path
) -> Path:
    """Write `out` (JSON lines: question, answer, alternate) for every row of the forget set
    (data.forget / data.forget_split), each alternate the generator's answer to
    alternate_prompts; generate(prompts) -> texts, e.g. modeling.greedy_generate bound to a model.
    An empty generation is kept as "" and refused when a run reads the file."""
    forget = load_qa_split(config.forget, config.forget_split, what="forget set")
    questions, answers = list(forget["question"]), list(forget["answer"])
    texts = generate(alternate_prompts(questions, answers, tokenizer, config.template))
    if len(texts) != len(questions):
        raise ValueError(f"the generator gave {len(texts)} answers for {len(questions)} prompts")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": q, "answer": a, ALTERNATE_COLUMN: t.strip()}
        for q, a, t in zip(questions, answers, texts, strict=True)
    ]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out
