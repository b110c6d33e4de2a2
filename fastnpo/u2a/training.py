"""AdamW passes over shuffled mini-batches: the one training loop of U2A (inner unlearning and
the base model's fine-tuning on the synthetic task)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data import collate
from ..losses import nll_from_logprobs
from ..modeling import SequenceLogprobModel


def adamw_epochs(
    params: list[torch.Tensor],
    num_examples: int,
    loss_of: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    max_grad_norm: float = 0.0,
    name: str = "training",
) -> list[float]:
    """`epochs` seeded shuffles of range(num_examples), one AdamW step per mini-batch on
    loss_of(positions, step); returns the losses. max_grad_norm 0 = no clipping.

    A non-finite loss or gradient raises ValueError BEFORE the step that would write it into
    the model (which keeps its last finite state)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(order[start : start + batch_size], len(losses))
            if not torch.isfinite(loss):
                raise ValueError(f"the {name} loss became non-finite at step {len(losses)}; the model was not updated")
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if not torch.isfinite(norm):
                raise ValueError(
                    f"the {name} gradient became non-finite at step {len(losses)}; the model was not updated"
                )
            optimizer.step()
            losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    return losses


def supervised_finetune(model, items: list[dict], *, pad_id: int, epochs: int, lr: float, batch_size: int, seed: int):
    """Token-mean NLL on tokenised items: a from-scratch model first learns the chosen AND the
    rejected texts, so unlearning has something to remove. Returns the last batch's loss."""
    wrapper = SequenceLogprobModel(model)
    device = next(model.parameters()).device

    def loss_of(positions, step):
        batch = collate([items[i] for i in positions.tolist()], pad_id)
        logps, counts, _ = wrapper({k: v.to(device) for k, v in batch.items()})
        return nll_from_logprobs(logps, counts)

    losses = adamw_epochs(
        list(model.parameters()),
        len(items),
        loss_of,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.0,
        seed=seed,
        name="fine-tuning",
    )
    return losses[-1] if losses else float("nan")
