"""Tokenisation: prompt template + answer, labels -100 on the prompt, truncation."""

from __future__ import annotations

import warnings

import torch

from ..ops.logprobs import IGNORE_INDEX
from .config import DataConfig, check_template


def encode_prompt(tokenizer, question: str, *, template: str) -> list[int]:
    """The prompt ids an answer follows (bos + template, or the chat template's user turn with
    the generation prompt): where greedy generation starts, identical to encode_qa's prompt."""
    if template == "chat":
        user = [{"role": "user", "content": question}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(template.format(question=question), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos, *prompt_ids]
    return prompt_ids


def _encode(tokenizer, question: str, answer: str, template: str, answer_prefix: str) -> tuple[list, list]:
    """(prompt ids, answer ids), tokenised separately so the boundary is exact."""
    prompt_ids = encode_prompt(tokenizer, question, template=template)
    if template == "chat":
        full_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
        )
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        # Some templates render the question differently once an answer follows (or strip the
        # generation prompt); then "the rest" would not be the answer.
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the tokenizer's chat template does not render the prompt (user turn + generation "
                "prompt) as a prefix of the full conversation; use a format-string template instead"
            )
        return prompt_ids, full_ids[len(prompt_ids) :]
    answer_ids = tokenizer(answer_prefix + answer, add_special_tokens=False)["input_ids"]
    return prompt_ids, [*answer_ids, tokenizer.eos_token_id]


def _check_tokenizer(tokenizer, template: str) -> None:
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if template != "chat" and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: answers must end with one so the model learns to stop")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the tokenizer has no chat_template")


def _build_example(prompt_ids, answer_ids, max_length: int, index, what: str = "") -> tuple[dict, bool]:
    input_ids = [*prompt_ids, *answer_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    # labels[0] is never a target after the shift, so it does not count as an answer token.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        where = "" if index is None else f"{what}{', ' if what else ''}example {index} (counting from 0): "
        raise ValueError(
            f"{where}truncation to max_length={max_length} leaves no answer token "
            f"(prompt is {len(prompt_ids)} tokens); raise max_length or shorten the template"
        )
    return {"input_ids": input_ids, "labels": labels}, truncated


def encode_qa(
    tokenizer,
    question: str,
    answer: str,
    *,
    template: str = "[INST] {question} [/INST]",
    answer_prefix: str = " ",
    max_length: int = 256,
) -> dict[str, list[int]]:
    """One QA pair as ``{"input_ids", "labels"}``: bos + template(question) + answer_prefix +
    answer + eos, labels -100 on the prompt. With template="chat" the prompt is the chat
    template's user turn plus generation prompt and the answer is the rest of the rendered
    conversation (no eos added: the template ends the turn). Truncated from the right to
    max_length with a warning; ValueError if no answer token survives."""
    check_template(template)
    _check_tokenizer(tokenizer, template)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    for name, value in (("question", question), ("answer", answer), ("answer_prefix", answer_prefix)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    prompt_ids, answer_ids = _encode(tokenizer, question, answer, template, answer_prefix)
    example, truncated = _build_example(prompt_ids, answer_ids, max_length, None)
    if truncated:
        warnings.warn(f"QA pair truncated to max_length={max_length} tokens", stacklevel=2)
    return example


class QADataset(torch.utils.data.Dataset):
    """Tokenised examples: ``{"index", "input_ids", "labels"}`` dicts, index = row in the source split."""

    def __init__(self, items: list[dict]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]

    @property
    def indices(self) -> list[int]:
        return [item["index"] for item in self.items]


def tokenize_split(
    dataset, tokenizer, config: DataConfig, answer_column: str = "answer", *, what: str = ""
) -> QADataset:
    """Tokenise every row of ``dataset`` (question + ``answer_column``) with config's template.

    answer_column selects the answer, e.g. "idk_answer" after add_idk_answers for IdkDPO.
    what: how errors name the set and its file (e.g. "forget set 'data/f.jsonl'").
    Truncations are reported in one warning with their count.
    """
    if not isinstance(config, DataConfig):
        raise ValueError(f"config must be a DataConfig, got {type(config).__name__}")
    _check_tokenizer(tokenizer, config.template)
    columns = dataset.column_names if hasattr(dataset, "column_names") else None
    if columns is None:
        raise ValueError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    for column in ("question", answer_column):
        if column not in columns:
            raise ValueError(f"dataset has no {column!r} column; columns: {columns}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    questions, answers = dataset["question"], dataset[answer_column]
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        if not isinstance(q, str) or not isinstance(a, str):
            where = f"{what}, " if what else ""
            raise ValueError(
                f"{where}example {i} (counting from 0): question and {answer_column!r} must be strings, "
                f"got {q!r}, {a!r}"
            )

    if config.template == "chat":
        pairs = [
            _encode(tokenizer, q, a, "chat", config.answer_prefix)
            for q, a in zip(questions, answers, strict=True)
        ]
    else:
        # One batched call per side: the fast tokenizer parallelises it.
        prompts = tokenizer([config.template.format(question=q) for q in questions], add_special_tokens=False)
        replies = tokenizer([config.answer_prefix + a for a in answers], add_special_tokens=False)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pairs = []
        for p, a in zip(prompts["input_ids"], replies["input_ids"], strict=True):
            if bos is not None and (not p or p[0] != bos):
                p = [bos, *p]
            pairs.append((p, [*a, eos]))

    items, truncated = [], 0
    for i, (p, a) in enumerate(pairs):
        example, cut = _build_example(p, a, config.max_length, i, what)
        truncated += cut
        items.append({"index": i, **example})
    if truncated:
        warnings.warn(
            f"{truncated} of {len(items)} examples truncated to max_length={config.max_length} tokens",
            stacklevel=2,
        )
    return QADataset(items)
