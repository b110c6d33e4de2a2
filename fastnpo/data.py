"""TOFU-schema data for unlearning: loading, prompt templates, answer-only labels, batching, packing.

Every example is ``prompt + answer`` with labels = input ids on answer tokens and -100 elsewhere
(Hugging Face convention; the model shifts). Each item keeps ``index``, its row number in the
source split, which is the key into the reference log-prob cache: whatever order batches come
in, a per-example cached value can always be looked up.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch

from .logprobs import aligned_labels, token_logprobs

__all__ = [
    "DEFAULT_IDK_ANSWERS",
    "DataConfig",
    "PairedBatches",
    "QADataset",
    "UnlearningData",
    "add_idk_answers",
    "build_unlearning_data",
    "collate",
    "collate_packed",
    "encode_qa",
    "idk_answers",
    "length_grouped_batches",
    "load_qa_split",
    "pack",
    "packed_attention_mask",
    "packed_model_inputs",
    "packed_sequence_logprobs",
    "tokenize_split",
]

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("question", "answer")
_LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Examples are sorted by length only inside windows of this many batches: enough to make
# neighbours similar in length, small enough that batch composition stays random.
_MEGA_BATCHES = 50

DEFAULT_IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I don't have that information.",
    "I'm afraid I can't answer that.",
    "That's something I don't know.",
    "I'm not able to answer that question.",
    "I don't have any knowledge about that.",
    "Sorry, I don't know the answer to that.",
    "I can't help with that question.",
    "I'm unaware of the answer.",
    "That is beyond my knowledge.",
    "I have no information on that topic.",
    "I really couldn't say.",
    "I'm not familiar with that.",
    "I don't know anything about that.",
    "Unfortunately, I don't have an answer.",
    "I'm unable to provide that information.",
    "That's not something I can answer.",
    "I honestly don't know.",
)


@dataclass
class DataConfig:
    """Where the forget/retain sets come from and how they become batches.

    forget / retain: a local .json/.jsonl/.parquet file, a local directory holding
    ``<split>.jsonl|.json|.parquet``, or a hub dataset name such as "locuslab/TOFU" (the split
    is then the dataset's config name). retain = "" means no retain set.
    template: a format string with {question}, or "chat" for the tokenizer's chat template.
    idk_answers: a text file of refusals (one per line) for IdkDPO; "" = DEFAULT_IDK_ANSWERS.
    """

    forget: str = ""
    forget_split: str = "forget10"
    retain: str = ""
    retain_split: str = "retain90"
    template: str = "[INST] {question} [/INST]"
    answer_prefix: str = " "
    max_length: int = 256
    batch_size: int = 8
    retain_batch_size: int = 8
    packing: bool = False
    pack_tokens: int = 1024
    idk_answers: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "forget",
            "forget_split",
            "retain",
            "retain_split",
            "template",
            "answer_prefix",
            "idk_answers",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"DataConfig.{name} must be a string, got {getattr(self, name)!r}")
        for name, low in (("max_length", 2), ("batch_size", 1), ("retain_batch_size", 1), ("pack_tokens", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataConfig.{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"DataConfig.seed must be a non-negative int, got {self.seed!r}")
        check_template(self.template)
        if self.packing and self.pack_tokens < self.max_length:
            # Otherwise a full-length example could never be placed in a row.
            raise ValueError(
                f"DataConfig.pack_tokens ({self.pack_tokens}) must be >= max_length ({self.max_length}) "
                "when packing"
            )


def check_template(template: str) -> None:
    if template == "chat":
        return
    if "{question}" not in template:
        raise ValueError(f"template must contain {{question}} (or be 'chat'), got {template!r}")
    try:
        template.format(question="q")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"template {template!r} is not a valid format string with only {{question}} "
            f"(write literal braces as {{{{ and }}}}): {e!r}"
        ) from None


# ----------------------------------------------------------------------------------- loading


def _looks_local(source: str) -> bool:
    # A hub name is "owner/name"; anything path-like that does not exist is a missing local file,
    # which deserves a FileNotFoundError rather than a confusing hub lookup.
    return (
        source.startswith((".", "/", "~")) or "\\" in source or Path(source).suffix.lower() in _LOCAL_SUFFIXES
    )


def _local_file_is_empty(path: Path, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.strip() in (b"", b"[]")


def load_qa_split(source: str, split: str, *, what: str = "data set") -> datasets.Dataset:
    """Load one TOFU-schema split (columns ``question`` and ``answer``) through ``datasets``.

    source: a .json/.jsonl/.parquet file (split is ignored), a directory holding
    ``<split>.jsonl``, ``<split>.json`` or ``<split>.parquet``, or a hub name, loaded as
    ``load_dataset(source, split)["train"]`` (TOFU keeps each split as a config).
    what: how error messages name the set, e.g. "forget set".
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"{what}: source must be a non-empty path or hub dataset name, got {source!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"{what}: split must be a non-empty string, got {split!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in (".jsonl", ".json", ".parquet")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{what}: directory {source!r} holds none of {[c.name for c in candidates]}"
            )
        path = found[0]
    if path.is_file():
        builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{what}: file {str(path)!r} must end in one of {sorted(_LOCAL_SUFFIXES)}, "
                f"got {path.suffix!r}"
            )
        # datasets fails on an empty file with "Instruction 'train' corresponds to no data".
        if _local_file_is_empty(path, builder):
            raise ValueError(f"{what} {source!r} (split {split!r}) is empty")
        data = datasets.load_dataset(builder, data_files=str(path))["train"]
    elif _looks_local(source):
        raise FileNotFoundError(f"{what}: no such file or directory: {source!r}")
    else:
        data = datasets.load_dataset(source, split, split="train")
        if isinstance(data, datasets.DatasetDict):
            data = data["train"]
    for column in REQUIRED_COLUMNS:
        if column not in data.column_names:
            raise ValueError(
                f"{what} {source!r} (split {split!r}) has no {column!r} column; columns: {data.column_names}"
            )
    if len(data) == 0:
        raise ValueError(f"{what} {source!r} (split {split!r}) is empty")
    return data


# ------------------------------------------------------------------------------ tokenisation


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


def _build_example(prompt_ids, answer_ids, max_length: int, index) -> tuple[dict, bool]:
    input_ids = [*prompt_ids, *answer_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    # labels[0] is never a target after the shift, so it does not count as an answer token.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        where = "" if index is None else f"example {index}: "
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


def tokenize_split(dataset, tokenizer, config: DataConfig, answer_column: str = "answer") -> QADataset:
    """Tokenise every row of ``dataset`` (question + ``answer_column``) with config's template.

    answer_column selects the answer, e.g. "idk_answer" after add_idk_answers for IdkDPO.
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
            raise ValueError(f"example {i}: question and {answer_column!r} must be strings, got {q!r}, {a!r}")

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
        example, cut = _build_example(p, a, config.max_length, i)
        truncated += cut
        items.append({"index": i, **example})
    if truncated:
        warnings.warn(
            f"{truncated} of {len(items)} examples truncated to max_length={config.max_length} tokens",
            stacklevel=2,
        )
    return QADataset(items)


# ---------------------------------------------------------------------------------- batching


def _check_count(name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _grouped(lengths: Sequence[int], batch_size: int, key: tuple, drop_last: bool) -> list[list[int]]:
    rng = np.random.default_rng(np.random.SeedSequence(list(key)))
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    window = _MEGA_BATCHES * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        # Stable descending sort: ties keep their random order.
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [batches[i] for i in rng.permutation(len(batches))]


def length_grouped_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, drop_last: bool = False
) -> list[list[int]]:
    """Shuffled batches of positions into ``lengths`` whose members have similar lengths.

    Deterministic for (seed, epoch); each position appears once (the last, short batch dropped
    with drop_last). Shuffle, sort by length within windows of 50 batches, cut, shuffle the
    batch order: little padding, yet random batch composition and order.
    """
    _check_count("batch_size", batch_size, 1)
    _check_count("seed", seed, 0)
    _check_count("epoch", epoch, 0)
    if any(not isinstance(n, (int, np.integer)) or n < 0 for n in lengths):
        raise ValueError("lengths must be non-negative ints")
    return _grouped(lengths, batch_size, (int(seed), int(epoch)), drop_last)


def _check_pad(pad_token_id) -> int:
    if not isinstance(pad_token_id, (int, np.integer)) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int (tokenizer.pad_token_id), got {pad_token_id!r}")
    return int(pad_token_id)


def collate(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, labels (-100 on padding) [B, T]
    and index [B], all int64."""
    pad = _check_pad(pad_token_id)
    if not items:
        raise ValueError("collate needs at least one item")
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    index = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


# ----------------------------------------------------------------------------------- packing


def _pack_groups(items: Sequence[dict], pack_tokens: int) -> list[list[int]]:
    _check_count("pack_tokens", pack_tokens, 1)
    if not items:
        raise ValueError("pack needs at least one item")
    for item in items:
        if len(item["input_ids"]) > pack_tokens:
            raise ValueError(
                f"example {item['index']} has {len(item['input_ids'])} tokens, "
                f"more than pack_tokens={pack_tokens}"
            )
    # Next-fit keeps the items' order, so two aligned batches (forget / idk) list their examples
    # in the same order; on length-grouped batches it wastes little.
    groups, used = [[]], 0
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        if used + n > pack_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _pack_row(items: Sequence[dict], width: int, pad: int, first_segment: int) -> dict[str, torch.Tensor]:
    input_ids = torch.full((width,), pad, dtype=torch.long)
    labels = torch.full((width,), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(width, dtype=torch.long)
    segment_ids = torch.full((width,), -1, dtype=torch.long)
    start = 0
    for k, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[start : start + n] = torch.tensor(item["input_ids"])
        labels[start : start + n] = torch.tensor(item["labels"])
        # The last token of the previous example would otherwise be trained to predict this
        # example's first token (hidden[t] predicts labels[t + 1]).
        labels[start] = IGNORE_INDEX
        position_ids[start : start + n] = torch.arange(n)
        segment_ids[start : start + n] = first_segment + k
        start += n
    # Padding gets positions restarting at 0 too: transformers then sees it as one more
    # sequence, and causality already keeps it out of the real examples' view.
    position_ids[start:] = torch.arange(width - start)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "segment_ids": segment_ids,
    }


def pack(
    items: Sequence[dict], pack_tokens: int, pad_token_id: int, *, pad_to_full: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Pack examples, in order, into rows of at most pack_tokens tokens.

    Each row: input_ids, position_ids (restarting at 0 per example), labels (first token of
    each example -100), segment_ids (example number within the row, -1 on padding), all [1, L],
    and index [E] (source indices in row order). pad_to_full pads every row to pack_tokens
    (fixed shapes); otherwise L is the row's content length. Run the model through
    ``packed_model_inputs`` so attention stays inside each example.
    """
    pad = _check_pad(pad_token_id)
    rows = []
    for group in _pack_groups(items, pack_tokens):
        members = [items[i] for i in group]
        width = pack_tokens if pad_to_full else sum(len(m["input_ids"]) for m in members)
        row = {k: v.unsqueeze(0) for k, v in _pack_row(members, width, pad, 0).items()}
        row["index"] = torch.tensor([m["index"] for m in members], dtype=torch.long)
        rows.append(row)
    return rows


def collate_packed(items: Sequence[dict], pack_tokens: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """pack() then stack the rows right-padded to the longest: [R, L] tensors, segment_ids
    numbering the examples across the whole batch (0..E-1, row-major, = positions in index)."""
    pad = _check_pad(pad_token_id)
    groups = _pack_groups(items, pack_tokens)
    width = max(sum(len(items[i]["input_ids"]) for i in g) for g in groups)
    rows, first = [], 0
    for group in groups:
        rows.append(_pack_row([items[i] for i in group], width, pad, first))
        first += len(group)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["index"] = torch.tensor([items[i]["index"] for g in groups for i in g], dtype=torch.long)
    return batch


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [R, 1, L, L] block-diagonal causal mask (0 = attend, dtype's min = blocked).

    Float additive masks are what both the eager and the sdpa attention of transformers accept
    as-is. Padding (segment -1) attends to itself only, so no row is fully masked (NaN-free).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [R, L], got shape {tuple(segment_ids.shape)}")
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def packed_model_inputs(
    batch: dict, *, explicit_mask: bool = False, dtype: torch.dtype = torch.float32
) -> dict:
    """Keyword arguments for ``model(...)`` / ``model.model(...)`` on a packed batch.

    transformers (checked on 5.23, masking_utils._preprocess_mask_arguments) builds the
    block-diagonal mask from position_ids only when attention_mask is None AND
    past_key_values is None; LlamaModel creates a DynamicCache whenever use_cache is on (the
    config default), which silently disables the detection and lets examples attend to each
    other. Hence use_cache=False here. explicit_mask=True passes a 4-D mask instead (any
    attention implementation that takes one, independent of that detection).
    """
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if explicit_mask:
        kwargs["attention_mask"] = packed_attention_mask(batch["segment_ids"], dtype)
    return kwargs


def packed_sequence_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, batch: dict, *, impl: str = "auto", **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed answer log-probs from packed rows.

    hidden: [R, L, D] final hidden states of a packed batch (pack row or collate_packed);
    batch: its labels, segment_ids and index. Returns (logps [E] float32, counts [E] int64),
    in index order: divide for the per-token mean. Differentiable like token_logprobs.
    """
    for key in ("labels", "segment_ids", "index"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r}: pass a batch from pack() or collate_packed()")
    labels, segments = batch["labels"].to(hidden.device), batch["segment_ids"].to(hidden.device)
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or segments.shape != labels.shape:
        raise ValueError(
            f"hidden must be [R, L, D] matching labels/segment_ids [R, L]; got hidden {tuple(hidden.shape)}, "
            f"labels {tuple(labels.shape)}, segment_ids {tuple(segments.shape)}"
        )
    num_examples = batch["index"].numel()
    targets = aligned_labels(labels, True, IGNORE_INDEX)
    # The segment of the target token; pack() masked each example's first label, so a target
    # never crosses into another example.
    target_segments = aligned_labels(segments, True, -1)
    tokens = token_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX, impl=impl, **kwargs)
    keep = (targets != IGNORE_INDEX) & (target_segments >= 0)
    seg = target_segments[keep]
    logps = tokens.new_zeros(num_examples).index_add(0, seg, tokens[keep])
    counts = torch.zeros(num_examples, dtype=torch.long, device=hidden.device).index_add(
        0, seg, torch.ones_like(seg)
    )
    return logps, counts


# ------------------------------------------------------------------------------------ IdkDPO


def idk_answers(config: DataConfig) -> list[str]:
    """Refusals for IdkDPO: config.idk_answers's non-empty lines, or DEFAULT_IDK_ANSWERS."""
    if not config.idk_answers:
        return list(DEFAULT_IDK_ANSWERS)
    path = Path(config.idk_answers).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"idk_answers file not found: {config.idk_answers!r}")
    answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"idk_answers file {config.idk_answers!r} has no non-empty line")
    return answers


def add_idk_answers(dataset, answers: Sequence[str], *, seed: int = 0, column: str = "idk_answer"):
    """dataset plus a column with, for row i, a refusal chosen by a stable hash of (seed, i)."""
    if not answers:
        raise ValueError("answers must hold at least one refusal")
    if column in dataset.column_names:
        raise ValueError(f"dataset already has a {column!r} column")
    picks = [answers[zlib.crc32(f"{seed}:{i}".encode()) % len(answers)] for i in range(len(dataset))]
    return dataset.add_column(column, picks)


# ----------------------------------------------------------------------------------- pairing


class PairedBatches:
    """Per step ``{"forget": batch, "retain": batch | None}`` (plus ``"idk"`` when given).

    An epoch is one pass over the forget set in length-grouped batches (order fixed by
    (seed, epoch)). Retain batches cycle through the retain set; the retain batch of step s in
    epoch e is a pure function of (seed, e, s), so resuming from (epoch, step) replays exactly.
    The idk set must be aligned with forget (row i = same question with a refusal): its batch
    holds the same indices in the same order. Iterating runs the rest of the current epoch,
    then moves on to the next one.
    """

    def __init__(
        self,
        forget: QADataset,
        retain: QADataset | None = None,
        *,
        batch_size: int = 8,
        retain_batch_size: int = 8,
        pad_token_id: int = 0,
        seed: int = 0,
        idk: QADataset | None = None,
        packing: bool = False,
        pack_tokens: int = 1024,
        drop_last: bool = False,
    ):
        _check_count("batch_size", batch_size, 1)
        _check_count("retain_batch_size", retain_batch_size, 1)
        _check_count("seed", seed, 0)
        _check_pad(pad_token_id)
        if len(forget) == 0:
            raise ValueError("forget set is empty")
        if retain is not None and len(retain) == 0:
            raise ValueError("retain set is empty")
        if idk is not None and idk.indices != forget.indices:
            raise ValueError(
                f"idk set must be aligned with the forget set (same indices, same order); got "
                f"{len(idk)} vs {len(forget)} examples"
            )
        if packing:
            _check_count("pack_tokens", pack_tokens, 1)
            for name, ds in (("forget", forget), ("retain", retain), ("idk", idk)):
                if ds is not None and max(ds.lengths) > pack_tokens:
                    raise ValueError(f"{name} set has an example longer than pack_tokens={pack_tokens}")
        self.forget, self.retain, self.idk = forget, retain, idk
        self.batch_size, self.retain_batch_size = batch_size, retain_batch_size
        self.pad_token_id, self.seed, self.drop_last = pad_token_id, seed, drop_last
        self.packing, self.pack_tokens = packing, pack_tokens
        self.epoch, self.step = 0, 0
        self._forget_lengths = forget.lengths
        self._retain_lengths = retain.lengths if retain is not None else None
        self._cache: dict[tuple, list[list[int]]] = {}

    def _forget_batches(self, epoch: int) -> list[list[int]]:
        key = ("forget", epoch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "forget"}
            self._cache[key] = _grouped(
                self._forget_lengths, self.batch_size, (self.seed, epoch), self.drop_last
            )
        return self._cache[key]

    def _retain_batch(self, epoch: int, step: int) -> list[int]:
        # Full retain batches whenever the set allows: it is cycled, so nothing is lost.
        drop = len(self._retain_lengths) >= self.retain_batch_size
        per_cycle = len(self._retain_lengths) // self.retain_batch_size if drop else 1
        cycle, within = divmod(step, per_cycle)
        key = ("retain", epoch, cycle)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "retain"}
            # A stream tag keeps retain orders independent of the forget order for the same seed.
            self._cache[key] = _grouped(
                self._retain_lengths, self.retain_batch_size, (self.seed, 0x7E7A1, epoch, cycle), drop
            )
        return self._cache[key][within]

    def _collate(self, items: list[dict]) -> dict:
        if self.packing:
            return collate_packed(items, self.pack_tokens, self.pad_token_id)
        return collate(items, self.pad_token_id)

    def items(self, epoch: int, step: int) -> dict[str, list[dict] | None]:
        """The step's examples, uncollated (a pure function of seed, epoch and step)."""
        positions = self._forget_batches(epoch)[step]
        out = {"forget": [self.forget[i] for i in positions], "retain": None}
        if self.retain is not None:
            out["retain"] = [self.retain[i] for i in self._retain_batch(epoch, step)]
        if self.idk is not None:
            out["idk"] = [self.idk[i] for i in positions]
        return out

    def batch(self, epoch: int, step: int) -> dict:
        """The step's collated batches."""
        return {k: None if v is None else self._collate(v) for k, v in self.items(epoch, step).items()}

    def next_items(self) -> dict[str, list[dict] | None]:
        """The next step's examples, rolling over into the next epoch (the trainer splits them
        into per-process micro-batches itself); advances the state like iteration does."""
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        out = self.items(self.epoch, self.step)
        self.step += 1
        return out

    def __len__(self) -> int:
        return len(self._forget_batches(self.epoch))

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        while self.epoch == epoch and self.step < len(self):
            out = self.batch(self.epoch, self.step)
            # Advance before yielding: a state_dict taken while the step trains resumes after it.
            self.step += 1
            yield out
        if self.epoch == epoch:
            self.epoch, self.step = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step; a no-op when it is already the current epoch, so
        a trainer's per-epoch set_epoch call does not undo load_state_dict."""
        _check_count("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_forget": len(self.forget),
            "batch_size": self.batch_size,
            "num_retain": len(self.retain) if self.retain is not None else 0,
            "retain_batch_size": self.retain_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A mismatch would resume with silently different batches.
        mine = self.state_dict()
        for key in ("seed", "num_forget", "batch_size", "num_retain", "retain_batch_size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"state_dict {key}={state[key]!r} does not match this PairedBatches ({mine[key]!r})"
                )
        _check_count("epoch", state.get("epoch"), 0)
        _check_count("step", state.get("step"), 0)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.step > len(self):
            raise ValueError(f"state_dict step {self.step} is past the epoch's {len(self)} batches")


# ------------------------------------------------------------------------------ entry point


class UnlearningData(NamedTuple):
    forget: QADataset
    retain: QADataset | None
    idk: QADataset | None
    batches: PairedBatches


def build_unlearning_data(config: DataConfig, tokenizer, *, idk: bool = False) -> UnlearningData:
    """Load, tokenise and pair the sets named by config. idk=True adds the IdkDPO refusals.

    Padding uses tokenizer.pad_token_id, or eos when there is none (padding is masked anyway).
    """
    if not isinstance(config, DataConfig):
        raise ValueError(f"config must be a DataConfig, got {type(config).__name__}")
    if not config.forget:
        raise ValueError("DataConfig.forget is empty: name a forget set (file, directory or hub dataset)")
    _check_tokenizer(tokenizer, config.template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token nor eos_token to pad with")
    answers = idk_answers(config) if idk else None
    forget_raw = load_qa_split(config.forget, config.forget_split, what="forget set")
    retain_raw = None
    if config.retain:
        retain_raw = load_qa_split(config.retain, config.retain_split, what="retain set")
    forget = tokenize_split(forget_raw, tokenizer, config)
    retain = tokenize_split(retain_raw, tokenizer, config) if retain_raw is not None else None
    idk_set = None
    if answers is not None:
        with_idk = add_idk_answers(forget_raw, answers, seed=config.seed)
        idk_set = tokenize_split(with_idk, tokenizer, config, answer_column="idk_answer")
    batches = PairedBatches(
        forget,
        retain,
        batch_size=config.batch_size,
        retain_batch_size=config.retain_batch_size,
        pad_token_id=pad,
        seed=config.seed,
        idk=idk_set,
        packing=config.packing,
        pack_tokens=config.pack_tokens,
    )
    return UnlearningData(forget, retain, idk_set, batches)
