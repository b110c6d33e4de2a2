"""The data side of the unlearning Trainer: column layout, pairing, collation, reference log-prob columns.

Dataset layout (one row per forget example; HF label convention): ``input_ids``, ``labels``
(IGNORE_INDEX on prompt tokens; default = input_ids), optional ``attention_mask``, ``ref_logp``
(summed log-prob of the labels under the reference model), optional ``weight``; the retain example
paired with it as ``retain_input_ids`` / ``retain_labels``; a refusal (the "idk" set) as ``idk_input_ids`` /
``idk_labels`` / ``idk_ref_logp``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ...modeling import SequenceLogprobModel
from ...ops import IGNORE_INDEX, IMPLS
from ...refcache import reference_logprobs
from .patch import unwrap

__all__ = ["UnlearningCollator", "add_reference_logprobs", "column_prefix", "pair_with_retain"]

logger = logging.getLogger(__name__)

PREFIXES = {"forget": "", "retain": "retain_", "idk": "idk_"}


def column_prefix(set_name: str) -> str:
    """Column prefix of an example set: forget -> "", retain -> "retain_", idk -> "idk_"."""
    if set_name not in PREFIXES:
        raise ValueError(f"set must be one of {sorted(PREFIXES)}, got {set_name!r}")
    return PREFIXES[set_name]


def dataset_columns(dataset) -> list[str] | None:
    """Column names of a datasets.Dataset or a list of dicts; None for anything else."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, Mapping):  # DatasetDict
        raise TypeError("pass one split (a datasets.Dataset), not a DatasetDict")
    if names is not None:
        return list(names)
    try:
        first = dataset[0]
    except (TypeError, IndexError, KeyError):
        return None
    return list(first) if isinstance(first, Mapping) else None


def default_pad_token_id(tokenizer, model: nn.Module) -> int:
    """The tokenizer's pad id, else the model config's, else 0 (padding is masked out anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def pad_right(rows: Sequence[torch.Tensor], value: int, width: int | None = None) -> torch.Tensor:
    """[len(rows), width] from 1-D rows, right-padded with value (width: the longest row by default)."""
    padded = pad_sequence(list(rows), batch_first=True, padding_value=value)
    if width is not None:
        padded = nn.functional.pad(padded, (0, width - padded.shape[1]), value=value)
    return padded


def _as_list(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


def _rows(dataset, columns: Sequence[str]) -> dict[str, list]:
    if hasattr(dataset, "column_names"):
        return {c: dataset[c] for c in columns}
    return {c: [row[c] for row in dataset] for c in columns}


def _long(values) -> torch.Tensor:
    return torch.tensor(_as_list(values), dtype=torch.long)


@dataclass
class UnlearningCollator:
    """Pads every example set of a batch (forget, retain_*, idk_*) to one width and keeps the
    reference columns.

    Returns int64 ``{p}input_ids``, ``{p}attention_mask``, ``{p}labels`` (IGNORE_INDEX on padding;
    the input ids where a row has no labels) [B, T] for each prefix p present, and fp32 ``*ref_logp``
    and ``weight`` [B], int64 ``index`` [B] when present. Other columns (text) are dropped.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("UnlearningCollator needs at least one example")
        first = examples[0]
        prefixes = [p for p in PREFIXES.values() if f"{p}input_ids" in first]
        if not prefixes:
            raise ValueError(f"examples have no input_ids column; columns: {sorted(first)}")
        ids = {p: [_long(ex[f"{p}input_ids"]) for ex in examples] for p in prefixes}
        width = max(len(row) for rows in ids.values() for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for p in prefixes:
            labels, masks = [], []
            for row, (example, tokens) in enumerate(zip(examples, ids[p], strict=True)):
                given, mask = example.get(f"{p}labels"), example.get(f"{p}attention_mask")
                labels.append(tokens if given is None else _long(given))
                masks.append(torch.ones_like(tokens) if mask is None else _long(mask))
                for column, value in (("labels", labels[-1]), ("attention_mask", masks[-1])):
                    if len(value) != len(tokens):
                        raise ValueError(
                            f"example {row}: {p}{column} has {len(value)} entries, {p}input_ids {len(tokens)}"
                        )
            batch[f"{p}input_ids"] = pad_right(ids[p], int(self.pad_token_id), width)
            batch[f"{p}attention_mask"] = pad_right(masks, 0, width)
            batch[f"{p}labels"] = pad_right(labels, IGNORE_INDEX, width)
        for key in first:
            if key.endswith("ref_logp") or key == "weight":
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
            elif key == "index":
                batch[key] = torch.tensor([int(ex[key]) for ex in examples], dtype=torch.long)
        return batch


def pair_with_retain(forget_dataset, retain_dataset, *, seed: int = 0):
    """The forget dataset with each row paired with a retain row (``retain_input_ids``,
    ``retain_labels``, ``retain_attention_mask`` when present): a seeded permutation of the retain
    set, cycled when it is shorter. One dataset then feeds the Trainer's sampler, distributed
    sharding and gradient accumulation; the pairing is fixed (call again with another seed to
    re-pair between runs)."""
    import datasets

    if not isinstance(forget_dataset, datasets.Dataset) or not isinstance(retain_dataset, datasets.Dataset):
        raise TypeError("pair_with_retain takes two datasets.Dataset")
    if len(retain_dataset) == 0 or len(forget_dataset) == 0:
        raise ValueError("pair_with_retain needs non-empty forget and retain datasets")
    if "input_ids" not in retain_dataset.column_names:
        raise ValueError(
            f"retain_dataset has no 'input_ids' column; columns: {retain_dataset.column_names}. "
            "Tokenize it first (e.g. with fastnpo.data.encode_qa in dataset.map)"
        )
    generator = torch.Generator().manual_seed(seed)
    order, n = [], len(forget_dataset)
    while len(order) < n:
        order += torch.randperm(len(retain_dataset), generator=generator).tolist()
    picked = retain_dataset.select(order[:n])
    out = forget_dataset
    for column in ("input_ids", "labels", "attention_mask"):
        if column in picked.column_names:
            out = _set_column(out, f"retain_{column}", picked[column])
    return out


def _set_column(dataset, column: str, values: list):
    """The dataset (or list of dicts) with the column added, replacing one of the same name."""
    if not hasattr(dataset, "add_column"):
        return [{**row, column: value} for row, value in zip(dataset, values, strict=True)]
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, values)


def _reference_items(dataset, columns: list[str], sets: list[str]) -> dict[str, list[dict]]:
    """Each set's rows as reference-pass items (index, input_ids, labels), in dataset order."""
    items = {}
    for name in sets:
        p = column_prefix(name)
        wanted = [c for c in (f"{p}input_ids", f"{p}labels", f"{p}attention_mask") if c in columns]
        data = _rows(dataset, wanted)
        rows = []
        for i, input_ids in enumerate(data[f"{p}input_ids"]):
            input_ids = _as_list(input_ids)
            labels = _as_list(data[f"{p}labels"][i]) if f"{p}labels" in data else list(input_ids)
            if len(labels) != len(input_ids):
                raise ValueError(f"row {i}: {p}labels and {p}input_ids differ in length")
            rows.append({"index": i, "input_ids": input_ids, "labels": labels})
        items[name] = rows
    return items


def add_reference_logprobs(
    dataset,
    model: nn.Module,
    tokenizer=None,
    *,
    sets: Sequence[str] | None = None,
    batch_size: int = 8,
    impl: str = "auto",
    cache_dir=None,
    pad_token_id: int | None = None,
    log=None,
):
    """Attach the reference model's summed log-probs as columns (``ref_logp``, ``idk_ref_logp``).

    Call it with the model BEFORE unlearning (it is the reference): one no-grad pass with the
    fused log-prob op (fastnpo.modeling.SequenceLogprobModel), batches sorted by length. For a PEFT
    model, call it before get_peft_model or inside ``with model.disable_adapter():``.

    dataset: a datasets.Dataset (or a list of dicts) with ``{p}input_ids`` and optionally
        ``{p}labels`` / ``{p}attention_mask`` for each set's prefix p.
    sets: which example sets get a column: default "forget", plus "idk" when ``idk_input_ids``
        exists (the ref_sets of the methods that cache reference log-probs).
    cache_dir: optional folder for fastnpo's on-disk reference cache (fastnpo.refcache), keyed by
        fingerprints of the model weights, the tokenizer and the tokenized examples: a rerun on
        the same inputs loads the numbers instead of recomputing them. None or "": no on-disk
        cache (as U2A's run.cache_dir "").
    Returns a new dataset (or list) with the columns added (replaced if present).
    """
    columns = dataset_columns(dataset)
    if columns is None:
        raise TypeError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
    if sets is None:
        sets = ["forget"] + (["idk"] if "idk_input_ids" in columns else [])
    sets = list(sets)
    for name in sets:
        p = column_prefix(name)
        if f"{p}input_ids" not in columns:
            raise ValueError(f"dataset has no {p}input_ids column (set {name!r}); columns: {columns}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    base = unwrap(model) if not type(model).__module__.startswith("peft") else model
    SequenceLogprobModel(base, impl=impl)  # refuses unsupported models before any work
    if pad_token_id is None:
        pad_token_id = default_pad_token_id(tokenizer, base)
    ref, _ = reference_logprobs(
        base,
        tokenizer,
        _reference_items(dataset, columns, sets),
        pad_token_id=int(pad_token_id),
        batch_size=batch_size,
        impl=impl,
        cache_dir=cache_dir or None,  # "" is no cache, not the working directory
        log=log or logger.info,
    )
    out = dataset
    for name in sets:
        out = _set_column(out, f"{column_prefix(name)}ref_logp", ref.logps[name].tolist())
    return out
