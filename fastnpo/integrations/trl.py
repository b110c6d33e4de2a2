"""TRL: DPO on precomputed reference log-probs, with fastnpo's fused per-sequence log-probs.

``FusedDPOTrainer`` is a drop-in ``trl.DPOTrainer`` (trl >= 1.x) that

- computes the policy's chosen / rejected per-sequence log-probs with fastnpo's fused linear +
  log-softmax op inside the (patched) model's forward: no [tokens x vocab] logits, Triton kernels
  with gradient filtering on CUDA, the vocabulary-chunked PyTorch path elsewhere; under FSDP2 the
  lm_head weight is used inside the root module's forward (no ``full_tensor()``);
- takes the reference log-probs from the dataset columns ``ref_chosen_logps`` /
  ``ref_rejected_logps`` when they are there (computed anywhere: a previous run's
  ``trainer.train_dataset``, another machine) and never loads a reference model; columns that are
  missing are computed once, before training, with the same fused op (TRL's precompute pass).

It needs ``DPOConfig(precompute_ref_log_probs=True)``: the switch that, in TRL, means "no reference
model during training". Stock trl 1.16 cannot take reference columns from the user (with the switch
off it ignores them and loads a reference model; with it on it recomputes them and fails on the
duplicated columns), and it refuses Liger's fused linear cross-entropy in DPO outright; see
docs/integrations.md for the file:line references.

Supported DPO losses: ``loss_type`` in {"sigmoid", "hinge", "ipo", "sigmoid_norm"} (weighted sums
of them too), ``f_divergence_type="reverse_kl"``, no ``ld_alpha``, no ``use_weighting``, no MoE
auxiliary loss, text-only data. Other settings raise at construction.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from trl import DPOTrainer

from ..losses import dpo_from_logprobs
from ..ops import IGNORE_INDEX
from .hf import patch_model

__all__ = ["SUPPORTED_LOSS_TYPES", "FusedDPOTrainer"]

SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_NON_MODEL_KEYS = {"completion_mask", *REF_COLUMNS}


def _check_args(args) -> None:
    if args is None or not getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(
            "FusedDPOTrainer needs DPOConfig(precompute_ref_log_probs=True): reference log-probs come "
            "from the dataset columns ref_chosen_logps / ref_rejected_logps (computed once before training "
            "when missing), never from a reference model kept in memory"
        )
    unsupported = [t for t in args.loss_type if t not in SUPPORTED_LOSS_TYPES]
    if unsupported:
        raise NotImplementedError(
            f"FusedDPOTrainer supports loss_type in {SUPPORTED_LOSS_TYPES}, got {unsupported}; "
            "use trl.DPOTrainer for the others"
        )
    problems = {
        "f_divergence_type": args.f_divergence_type != "reverse_kl",
        "ld_alpha": args.ld_alpha is not None,
        "use_weighting": bool(args.use_weighting),
        "sync_ref_model": bool(args.sync_ref_model),
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        raise NotImplementedError(f"FusedDPOTrainer does not support {bad}; leave them at their defaults")


class FusedDPOTrainer(DPOTrainer):
    """trl.DPOTrainer whose policy log-probs come from fastnpo's fused op and whose reference
    log-probs come from dataset columns. Same arguments as DPOTrainer (no ref_model), plus
    ``impl`` ("auto", "triton", "torch") and ``filter_eps`` (see fastnpo.token_logprobs).

    Dataset: TRL's preference format (prompt / chosen / rejected), optionally with float columns
    ``ref_chosen_logps`` and ``ref_rejected_logps``: summed log-probs of the chosen / rejected
    completion tokens (the same tokens TRL scores) under the reference model.
    """

    def __init__(self, model, ref_model=None, args=None, *, impl: str = "auto", filter_eps="auto", **kwargs):
        if ref_model is not None:
            raise ValueError(
                "FusedDPOTrainer keeps no reference model: pass reference log-probs as the dataset columns "
                "ref_chosen_logps / ref_rejected_logps, or let it compute them once from the initial model"
            )
        _check_args(args)
        self._fastnpo_impl, self._fastnpo_filter_eps = impl, filter_eps
        super().__init__(model, ref_model=None, args=args, **kwargs)
        if getattr(self, "aux_loss_enabled", False):
            raise NotImplementedError("FusedDPOTrainer does not add the MoE load-balancing loss")
        self._ensure_patched()

    # ------------------------------------------------------------------ fused log-probs

    def _ensure_patched(self) -> None:
        # Patched lazily: TRL loads a model given by name, and wraps PEFT, inside DPOTrainer.__init__.
        patch_model(self.model, impl=self._fastnpo_impl, filter_eps=self._fastnpo_filter_eps)

    def _sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs [2B] (chosen rows first) and completion token counts [2B]."""
        self._ensure_patched()
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        outputs = model(**model_kwargs, labels=labels, return_sequence_logprobs=True)
        if getattr(outputs, "sequence_logps", None) is None:
            raise RuntimeError("the model lost its fastnpo patch (no sequence_logps in its output)")
        return outputs.sequence_logps, outputs.token_counts

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch, with the fused op (used by the precompute pass)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and hasattr(self.model, "disable_adapter"):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), adapter, self.accelerator.autocast():
            logps, _ = self._sequence_logps(model, inputs)
        return logps.float().chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        columns = getattr(dataset, "column_names", None) or []
        present = [c for c in REF_COLUMNS if c in columns]
        if len(present) == 2:
            return dataset  # supplied by the user: used as they are
        if len(present) == 1:
            missing = next(c for c in REF_COLUMNS if c not in columns)
            raise ValueError(
                f"the {name} dataset has {present[0]!r} but no {missing!r}: give both reference columns or neither"
            )
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ------------------------------------------------------------------ the loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        for column in REF_COLUMNS:
            if column not in inputs:
                raise ValueError(
                    f"the batch has no {column!r}: FusedDPOTrainer reads reference log-probs from the "
                    "dataset (precompute_ref_log_probs=True fills them in before training)"
                )
        logps, _ = self._sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2, dim=0)
        ref_chosen = inputs["ref_chosen_logps"].to(chosen)
        ref_rejected = inputs["ref_rejected_logps"].to(chosen)
        chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_logratios - rejected_logratios

        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                term = dpo_from_logprobs(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, scale=1.0)
            elif loss_type == "hinge":
                term = torch.relu(1 - self.beta * delta).mean()
            elif loss_type in ("ipo", "sigmoid_norm"):
                # TRL normalises by the completion lengths (completion_mask sums, including the first token)
                chosen_mask, rejected_mask = inputs["completion_mask"].chunk(2, dim=0)
                normalized = chosen_logratios / chosen_mask.sum(dim=1).clamp(min=1.0) - (
                    rejected_logratios / rejected_mask.sum(dim=1).clamp(min=1.0)
                )
                if loss_type == "ipo":
                    term = ((normalized - 1 / (2 * self.beta)) ** 2).mean()
                else:
                    term = -F.logsigmoid(self.beta * normalized).mean()
            else:  # guarded in __init__
                raise NotImplementedError(loss_type)
            loss = loss + weight * term

        self._log_metrics(mode, inputs, chosen, rejected, chosen_logratios, rejected_logratios)
        if return_outputs:
            # Trainer's compute_metrics path wants logits: one extra no-grad forward, as TRL does.
            with torch.no_grad():
                model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, chosen, rejected, chosen_logratios, rejected_logratios) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
