"""Which example each position of a batch belongs to, and per-example log-probs of packed rows
(several examples per row, data.collate_packed)."""

import torch

from .logprobs import IGNORE_INDEX, aligned_labels, token_logprobs


def example_of_positions(batch: dict) -> torch.Tensor:
    """[R, L]: the example (its place in the batch) of each attended position, -1 on padding. A
    padded batch (attention_mask) holds one example per row; a packed one says it in segment_ids."""
    if "segment_ids" in batch:
        return batch["segment_ids"]
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)[:, None]
    return torch.where(batch["attention_mask"] > 0, rows, -1)


def target_owner(batch: dict) -> torch.Tensor:
    """[R, L]: the example whose target each position predicts, -1 where none (prompt, padding, an
    example's last position); aligned with the hidden states like aligned_labels(labels, True)."""
    targets = aligned_labels(batch["labels"], True, IGNORE_INDEX)
    owner = aligned_labels(example_of_positions(batch), True, -1)
    return torch.where(targets != IGNORE_INDEX, owner, -1)


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
            raise ValueError(f"batch has no {key!r}: pass a batch from collate_packed()")
    labels, segments = batch["labels"].to(hidden.device), batch["segment_ids"].to(hidden.device)
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or segments.shape != labels.shape:
        raise ValueError(
            f"hidden must be [R, L, D] matching labels/segment_ids [R, L]; got hidden {tuple(hidden.shape)}, "
            f"labels {tuple(labels.shape)}, segment_ids {tuple(segments.shape)}"
        )
    num_examples = batch["index"].numel()
    targets = aligned_labels(labels, True, IGNORE_INDEX)
    # The segment of the target token; collate_packed() masked each example's first label, so a target
    # never crosses into another example.
    target_segments = aligned_labels(segments, True, -1)
    tokens = token_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX, impl=impl, **kwargs)
    keep = (targets != IGNORE_INDEX) & (target_segments >= 0)
    seg = target_segments[keep]
    logps = tokens.new_zeros(num_examples).index_add(0, seg, tokens[keep])
    counts = torch.zeros(num_examples, dtype=torch.long, device=hidden.device).index_add(0, seg, torch.ones_like(seg))
    return logps, counts
