"""The reference pass: the initial model's per-sequence log-probs of every example a loss needs,
computed once and cached by content. The trainer, `fastnpo cache-ref`, the Hugging Face route
(add_reference_logprobs) and U2A all call reference_logprobs, so they share cache entries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..data import collate
from ..modeling import SequenceLogprobModel, output_weight
from ..ops import IGNORE_INDEX, aligned_labels
from .build import get_or_build_ref_logprobs
from .fingerprint import ref_cache_parts
from .store import RefLogprobs


@torch.no_grad()
def item_logprobs(
    model: SequenceLogprobModel, items: list[dict], pad_token_id: int, batch_size: int, on_batch=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (fp32) and target counts (int64) of tokenized items, on CPU, in item order.

    No grad, batches of similar length (least padding), on_batch(size) after each batch.
    """
    device = output_weight(model.lm).device
    logps, counts = torch.zeros(len(items)), torch.zeros(len(items), dtype=torch.long)
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = collate([items[i] for i in chosen], pad_token_id)
        sequence_logps, target_counts, _ = model({k: v.to(device) for k, v in batch.items()})
        logps[chosen], counts[chosen] = sequence_logps.float().cpu(), target_counts.cpu()
        if on_batch is not None:
            on_batch(len(chosen))
    return logps, counts


@torch.no_grad()
def item_target_hidden_states(
    model: SequenceLogprobModel, items: list[dict], pad_token_id: int, batch_size: int
) -> dict[int, torch.Tensor]:
    """{item["index"]: the final hidden states [n_i, D] (after the final norm, on CPU) at the n_i
    positions that predict the item's targets}: what a method that keeps the reference's hidden
    states builds once (Method.prepare; no grad, eval mode for the pass, batches of similar length)."""
    device = output_weight(model.lm).device
    rows: dict[int, torch.Tensor] = {}
    order = sorted(items, key=lambda item: -len(item["input_ids"]))
    was_training = model.lm.training
    model.lm.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = collate(order[start : start + batch_size], pad_token_id)
            hidden = model.hidden_states({k: v.to(device) for k, v in batch.items()})
            targets = aligned_labels(batch["labels"], True, IGNORE_INDEX).to(device)
            for row, index in enumerate(batch["index"].tolist()):
                rows[index] = hidden[row][targets[row] != IGNORE_INDEX].cpu()
    finally:
        model.lm.train(was_training)
    return rows


def sharded_item_logprobs(
    model: SequenceLogprobModel,
    items: list[dict],
    pad_token_id: int,
    batch_size: int,
    info: distributed.ProcessInfo,
    *,
    progress: bool = False,
    desc: str = "reference log-probs",
) -> tuple[torch.Tensor, torch.Tensor]:
    """item_logprobs indexed by item["index"]: each process does a strided share and the
    shares are gathered, so every process ends with every example's numbers."""
    mine = items[info.rank :: info.world_size]
    bar = tqdm(total=len(mine), desc=desc, disable=not (progress and info.is_main), leave=False)
    logps, counts = item_logprobs(model, mine, pad_token_id, batch_size, on_batch=bar.update)
    bar.close()
    results = list(zip([item["index"] for item in mine], logps.tolist(), counts.tolist(), strict=True))
    gathered = [row for part in distributed.all_gather_objects(results, info) for row in part]
    size = max(item["index"] for item in items) + 1
    logps, counts = torch.zeros(size), torch.zeros(size, dtype=torch.long)
    for index, logp, count in gathered:
        logps[index], counts[index] = logp, count
    return logps, counts


def reference_logprobs(
    model: nn.Module,
    tokenizer,
    sets: dict[str, list[dict]],
    *,
    pad_token_id: int,
    batch_size: int,
    impl: str = "auto",
    cache_dir: str | Path | None = None,
    info: distributed.ProcessInfo | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[RefLogprobs, bool | None]:
    """(reference log-probs of every set, cache hit) for a Hugging Face causal LM in its
    initial state; hit is None without a cache_dir.

    sets: tokenized items ({"index", "input_ids", "labels"}) per set name. With cache_dir the
    numbers are keyed by fingerprints of the weights, the model config, the tokenizer, the
    tokenized examples (data, template, max length), impl and dtype (refcache.ref_cache_parts).
    With info (several processes) the ranks agree on hit or miss (a hit only if every rank
    found the file), each computes a share on a miss, and all load the file their node's first
    rank wrote (cache_dir shared by every node, or node-local).
    """
    info = info or distributed.ProcessInfo(0, 1, 0, output_weight(model).device)
    wrapper = SequenceLogprobModel(model, impl=impl)
    was_training = model.training

    def compute():
        model.eval()
        try:
            logps, counts = {}, {}
            for name, items in sets.items():
                logps[name], counts[name] = sharded_item_logprobs(
                    wrapper,
                    items,
                    pad_token_id,
                    batch_size,
                    info,
                    progress=progress,
                    desc=f"reference log-probs ({name})",
                )
            return logps, counts
        finally:
            model.train(was_training)

    if cache_dir is None:
        logps, counts = compute()
        return RefLogprobs(logps=logps, counts=counts, key=""), None
    parts = ref_cache_parts(
        model=model, tokenizer=tokenizer, examples=sets, impl=impl, dtype=str(output_weight(model).dtype)
    )
    return get_or_build_ref_logprobs(
        cache_dir,
        parts,
        compute,
        rank=info.rank,
        world_size=info.world_size,
        local_rank=info.local_rank,
        barrier=lambda: distributed.barrier(info),
        log=log,
        # Each rank reads the file on its own; another job may write it between their reads.
        # A hit on some ranks only would send the others alone into the collective compute.
        all_agree=lambda hit: distributed.all_true(hit, info),
    )
