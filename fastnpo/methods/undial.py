"""UNDIAL (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
Large Language Models", arXiv 2402.10052).

The token-mean over the forget answer tokens of the cross-entropy toward the reference model's
distribution with the label's logit lowered by undial_beta (10, open-unlearning's
configs/trainer/UNDIAL.yaml) before the softmax, detached; no retain term (open-unlearning's
alpha 0). The reference is UndialReference (the initial model's final hidden states of the forget
answer tokens and its lm_head, built once by `prepare`), not a second model; the loss runs
vocabulary chunk by chunk (ops.undial_token_losses).
"""

from typing import ClassVar

import torch

from ..config import require
from ..ops import undial_token_losses
from .base import Method, PrepareInputs, target_ranks


class Undial(Method):
    name, label = "undial", "UNDIAL"
    token_level = True
    keeps_reference_head = True
    prepares_examples = True
    prepared_what = "cached reference hidden states"
    parameters: ClassVar[dict] = {"undial_beta": 10.0}

    def check(self, config) -> None:
        require(config.undial_beta > 0, "method.undial_beta", "must be > 0", config.undial_beta)

    def prepare(self, config, inputs: PrepareInputs) -> "UndialReference":
        """The initial model's final hidden states (after the final norm) of every forget example's
        answer tokens, kept in memory for the run on the CPU in the model's dtype, and one copy of
        the lm_head weight on the model's device."""
        rows = inputs.target_hidden_states(inputs.forget)
        return UndialReference.from_rows(rows, inputs.output_weight)

    def describe(self, state: "UndialReference") -> str:
        return f"undial reference: {state.hidden.shape[0]} answer tokens, {state.nbytes / 2**20:.1f} MiB"

    def reference_rows(self, state, owner, scored, example_index):
        if state is None or example_index is None:
            return None
        index = example_index.to(owner.device)[owner[scored]]
        return state.gather(index, target_ranks(owner)[scored], device=owner.device)

    def token_values(self, config, token_logps, hidden, weight, targets, scored, reference=None):
        if reference is None:
            raise ValueError("method undial needs the reference hidden states and lm_head (UndialReference.gather)")
        return undial_token_values(hidden, weight, targets, scored, *reference, beta=config.undial_beta)


class UndialReference:
    """What UNDIAL needs of the reference model without keeping it: the initial model's final
    hidden states (after the final norm) of every forget example's answer tokens, and one copy of
    the initial lm_head weight. The reference distribution at a forget token is then
    softmax(h_ref @ W_ref.T), computed vocabulary chunk by chunk in the loss
    (ops.undial_token_losses). Memory: answer tokens x D x 2 bytes (bf16 model; kept on the CPU,
    a micro-batch's rows moved to the device per step) + V x D x 2 bytes (on the device); e.g.
    TOFU forget10 at 7B (about 16k answer tokens, D 4096, V 32000): 134 MB + 262 MB.

    hidden [T, D]: the examples' target rows concatenated; start / count [E] by example index
    (count 0 for an index without an example); weight [V, D].
    """

    def __init__(self, hidden: torch.Tensor, start: torch.Tensor, count: torch.Tensor, weight: torch.Tensor):
        self.hidden, self.start, self.count, self.weight = hidden, start.long(), count.long(), weight

    @classmethod
    def from_rows(cls, rows: dict[int, torch.Tensor], weight: torch.Tensor) -> "UndialReference":
        """From each example's target rows {example index: [n_i, D]} (the reference pass's output)
        and the lm_head weight (copied: training must not move it)."""
        count = torch.zeros(max(rows, default=-1) + 1, dtype=torch.long)
        for index, value in rows.items():
            count[index] = value.shape[0]
        empty = torch.zeros((0, weight.shape[1]), dtype=weight.dtype)
        hidden = torch.cat([rows[i].cpu() for i in sorted(rows)]) if rows else empty
        return cls(hidden, count.cumsum(0) - count, count, weight.detach().clone())

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size() + self.weight.numel() * self.weight.element_size()

    def gather(
        self, example_index: torch.Tensor, rank: torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference hidden states [K, D] on the weight's device, the weight) of K target
        positions: example_index [K] (the example's index in the forget set) and rank [K] (1-based
        rank of the target among the example's targets). device: where the weight should be
        (moved there once: a Hugging Face Trainer moves the model after the reference is built)."""
        if device is not None and self.weight.device != device:
            self.weight = self.weight.to(device)
        example_index, rank = example_index.cpu().long(), rank.cpu().long()
        known = (example_index >= 0) & (example_index < len(self.count))
        count = torch.where(known, self.count[example_index.clamp(0, max(0, len(self.count) - 1))], 0)
        bad = ~known | (rank < 1) | (rank > count)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"method undial: forget example {int(example_index[i])} has {int(count[i])} cached reference "
                f"answer tokens, but target {int(rank[i])} was asked for (did the data change after the "
                "reference pass?)"
            )
        rows = self.hidden.index_select(0, self.start[example_index] + rank - 1)
        return rows.to(self.weight.device, non_blocking=True), self.weight


# ----------------------------------------------------------------------------- the loss


def undial_token_values(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scored: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    beta: float = 10.0,
) -> torch.Tensor:
    """UNDIAL's per-token loss at the `scored` positions of aligned targets (0 elsewhere): hidden
    [..., D], weight [V, D], targets and scored [...]; ref_hidden [K, D] the reference's final
    hidden states of the K scored positions in row-major order, ref_weight [V, D] its lm_head."""
    if ref_hidden.dim() != 2 or ref_hidden.shape[0] != int(scored.sum()):
        raise ValueError(
            f"ref_hidden must be [{int(scored.sum())}, D] (one row per scored position), got {tuple(ref_hidden.shape)}"
        )
    values = undial_token_losses(hidden[scored], weight, ref_hidden, ref_weight, targets[scored], beta=beta)
    out = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put(tuple(scored.nonzero().T), values)
