"""Batches: which examples form each step (length-grouped, paired forget / retain / idk) and how a
step's examples become tensors (padded or packed rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ..ops.logprobs import IGNORE_INDEX
from .tokenize import QADataset

# Examples are sorted by length only inside windows of this many batches: enough to make
# neighbours similar in length, small enough that batch composition stays random.
_MEGA_BATCHES = 50


def _check_count(name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


# Why not transformers.trainer_pt_utils.get_length_grouped_indices: it permutes with torch's RNG
# (global or a generator, not our (seed, epoch) key), sizes its windows min(n // (4 * batch_size),
# 50) batches, swaps the longest example to the front and keeps the batches in window order
# (ours shuffles the batch order). Different RNG and grouping give a different batch order, hence
# different published demo numbers; and ours is a pure function of (seed, epoch, ...), which exact
# resumption relies on. Do not change the order this produces.
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

    def padded(key: str, value: int) -> torch.Tensor:
        rows = [torch.as_tensor(item[key], dtype=torch.long) for item in items]
        return pad_sequence(rows, batch_first=True, padding_value=value)

    input_ids, labels = padded("input_ids", pad), padded("labels", IGNORE_INDEX)
    attention_mask = pad_sequence(
        [torch.ones(len(item["input_ids"]), dtype=torch.long) for item in items], batch_first=True
    )
    index = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


# ----------------------------------------------------------------------------------- packing


def _pack_groups(items: Sequence[dict], pack_tokens: int) -> list[list[int]]:
    _check_count("pack_tokens", pack_tokens, 1)
    if not items:
        raise ValueError("collate_packed needs at least one item")
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


def collate_packed(items: Sequence[dict], pack_tokens: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pack examples, in order, into rows of at most pack_tokens tokens, right-padded to the
    longest row: [R, L] tensors input_ids, position_ids (restarting at 0 per example and on the
    padding), labels (each example's first token -100), segment_ids (examples numbered across the
    whole batch, 0..E-1 row-major = positions in index; -1 on padding), and index [E].

    Run the model with position_ids, no attention_mask and use_cache=False (as
    modeling.SequenceLogprobModel does): transformers then keeps attention inside each example.
    """
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


class PairedBatches:
    """Which examples each step trains on: ``{"forget": items, "retain": items | None}`` (plus
    ``"idk"`` / ``"alternate"`` when given), uncollated (the trainer splits them into micro-batches
    and collates).

    An epoch is one pass over the forget set in length-grouped batches (order fixed by
    (seed, epoch)). Retain batches cycle through the retain set; the retain batch of step s in
    epoch e is a pure function of (seed, e, s), so resuming from (epoch, step) replays exactly.
    The idk and alternate sets must be aligned with forget (row i = same question with a refusal
    or an alternate answer): their batches hold the same indices in the same order.
    """

    def __init__(
        self,
        forget: QADataset,
        retain: QADataset | None = None,
        *,
        batch_size: int = 8,
        retain_batch_size: int = 8,
        seed: int = 0,
        idk: QADataset | None = None,
        alternate: QADataset | None = None,
    ):
        _check_count("batch_size", batch_size, 1)
        _check_count("retain_batch_size", retain_batch_size, 1)
        _check_count("seed", seed, 0)
        if len(forget) == 0:
            raise ValueError("forget set is empty")
        if retain is not None and len(retain) == 0:
            raise ValueError("retain set is empty")
        for name, aligned in (("idk", idk), ("alternate", alternate)):
            if aligned is not None and aligned.indices != forget.indices:
                raise ValueError(
                    f"{name} set must be aligned with the forget set (same indices, same order); got "
                    f"{len(aligned)} vs {len(forget)} examples"
                )
        self.forget, self.retain, self.idk, self.alternate = forget, retain, idk, alternate
        self.batch_size, self.retain_batch_size, self.seed = batch_size, retain_batch_size, seed
        self.epoch, self.step = 0, 0
        self._forget_lengths = forget.lengths
        self._retain_lengths = retain.lengths if retain is not None else None
        self._cache: dict[tuple, list[list[int]]] = {}

    def _forget_batches(self, epoch: int) -> list[list[int]]:
        key = ("forget", epoch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "forget"}
            # Every forget example counts each epoch, so the last, short batch is kept.
            self._cache[key] = _grouped(self._forget_lengths, self.batch_size, (self.seed, epoch), False)
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

    def items(self, epoch: int, step: int) -> dict[str, list[dict] | None]:
        """The step's examples, uncollated (a pure function of seed, epoch and step)."""
        positions = self._forget_batches(epoch)[step]
        out = {"forget": [self.forget[i] for i in positions], "retain": None}
        if self.retain is not None:
            out["retain"] = [self.retain[i] for i in self._retain_batch(epoch, step)]
        if self.idk is not None:
            out["idk"] = [self.idk[i] for i in positions]
        if self.alternate is not None:
            out["alternate"] = [self.alternate[i] for i in positions]
        return out

    def next_items(self) -> dict[str, list[dict] | None]:
        """The next step's examples, rolling over into the next epoch; advances the state, so a
        state_dict taken while the step trains resumes after it."""
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        out = self.items(self.epoch, self.step)
        self.step += 1
        return out

    def __len__(self) -> int:
        """Steps in the current epoch."""
        return len(self._forget_batches(self.epoch))

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
