"""Batches: padding, length grouping, packing, and the paired forget / retain / idk steps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..ops.logprobs import IGNORE_INDEX
from .tokenize import QADataset

# Examples are sorted by length only inside windows of this many batches: enough to make
# neighbours similar in length, small enough that batch composition stays random.
_MEGA_BATCHES = 50


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
