"""UnlearningTrainer: a transformers.Trainer minimising a fastnpo unlearning loss on cached reference log-probs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from transformers import Trainer

from ...methods import (
    METHODS,
    MethodConfig,
    RMUState,
    UndialReference,
    forget_token_term,
    loss_terms,
    method_for,
    scored_targets,
    target_ranks,
)
from ...modeling import SequenceLogprobModel, output_weight
from ...ops import IGNORE_INDEX
from ...refcache import item_target_hidden_states
from .data import (
    PREFIXES,
    UnlearningCollator,
    _reference_items,
    column_prefix,
    dataset_columns,
    default_pad_token_id,
    pad_right,
)
from .patch import patch_model, unwrap

__all__ = ["UnlearningTrainer"]


def _missing_column(column: str, method: str) -> ValueError:
    if column.endswith("ref_logp"):
        fix = (
            "compute it once with the model before unlearning: "
            "dataset = fastnpo.integrations.hf.add_reference_logprobs(dataset, model, tokenizer)"
        )
    elif column.startswith("retain_"):
        fix = (
            "pair each forget row with a retain row: dataset = fastnpo.integrations.hf.pair_with_retain(forget, retain)"
        )
    else:
        fix = "tokenize the data first (input_ids; labels -100 on prompt tokens; see fastnpo.data.encode_qa)"
    return ValueError(f"method {method!r} needs the column {column!r}, which the data lacks; {fix}")


def _required_columns(method_name: str) -> list[str]:
    method = method_for(method_name)
    needed = [f"{column_prefix(s)}input_ids" for s in method.sets]
    needed += [f"{column_prefix(s)}ref_logp" for s in method.ref_sets]
    return needed


def _method_config(method, beta, forget_coeff, retain_coeff, simnpo_gamma, average_logprobs) -> MethodConfig:
    if isinstance(method, MethodConfig):
        config = method
    else:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        if beta is None:
            beta = 2.5 if method == "simnpo" else 0.1
        # The per-token methods and RMU have their own parameters (MethodConfig's wga_beta, ...):
        # pass method=MethodConfig(name=..., ...) to set them.
        config = MethodConfig(
            name=method,
            beta=beta,
            forget_coeff=forget_coeff,
            retain_coeff=retain_coeff,
            simnpo_gamma=simnpo_gamma,
            average_logprobs=average_logprobs,
        )
    if method_for(config.name).live_reference:
        raise NotImplementedError(
            f"method {config.name!r} needs the reference model's full distribution (its KL term), "
            "which cached log-prob columns cannot give; use fastnpo's own trainer (`fastnpo train`)"
        )
    return config


def _check_columns(method_name: str, **splits) -> None:
    """Refuse, before training, a dataset (or each dataset of a dict) that lacks a column the method reads."""
    for split, data in splits.items():
        for part in data.values() if isinstance(data, Mapping) else [data]:
            columns = dataset_columns(part) if part is not None else None
            for column in _required_columns(method_name) if columns is not None else ():
                if column not in columns:
                    raise ValueError(f"{split}: {_missing_column(column, method_name)}")


def _undial_key(input_ids, labels) -> tuple | None:
    """What identifies a forget row's cached reference hidden states: its input ids up to its last
    target and the target positions (the hidden states depend on nothing else); None without a
    target. The same for a dataset row and for the row right-padded in a batch."""
    input_ids, labels = [int(t) for t in input_ids], [int(t) for t in labels]
    positions = tuple(t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX)
    return (tuple(input_ids[: positions[-1] + 1]), positions) if positions else None


class _UndialRows:
    """UNDIAL's reference for the Hugging Face route: methods.UndialReference of every forget row
    of the train and eval datasets, computed from the model when the trainer is built (its initial
    state), and each row's place in it by content (_undial_key): rows arrive shuffled and without
    an index column."""

    @torch.no_grad()
    def __init__(self, model, datasets: list, pad_token_id: int, impl: str):
        items, self.places = [], {}
        for dataset in datasets:
            columns = dataset_columns(dataset)
            for item in _reference_items(dataset, columns, ["forget"])["forget"]:
                key = _undial_key(item["input_ids"], item["labels"])
                if key is not None and key not in self.places:
                    self.places[key] = len(items)
                    items.append({**item, "index": len(items)})
        rows = item_target_hidden_states(SequenceLogprobModel(model, impl=impl), items, pad_token_id, batch_size=8)
        self.reference = UndialReference.from_rows(rows, output_weight(model))

    def places_of(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B]: each forget row's example in the reference (-1 for a row without targets)."""
        places = []
        for ids, row_labels in zip(input_ids.tolist(), labels.tolist(), strict=True):
            key = _undial_key(ids, row_labels)
            if key is not None and key not in self.places:
                raise ValueError(
                    "method 'undial': a forget row that was not in train_dataset or eval_dataset when the "
                    "trainer was built has no cached reference hidden states; build a new UnlearningTrainer"
                )
            places.append(-1 if key is None else self.places[key])
        return torch.tensor(places, dtype=torch.long)

    def gather(self, places: torch.Tensor, ranks: torch.Tensor, device: torch.device):
        reference = self.reference
        if reference.weight.device != device:  # once: the Trainer moves the model after __init__
            reference.weight = reference.weight.to(device)
        return reference.gather(places, ranks)


class UnlearningTrainer(Trainer):
    """transformers.Trainer minimising a fastnpo unlearning loss on cached reference log-probs.

    method: ga | graddiff | npo | npo_rt | simnpo | idkdpo | finetune | wga | satimp | ceu | rmu |
    undial (fastnpo.methods), or a MethodConfig (to set the per-method parameters: wga_beta,
    satimp_beta1/2, ceu_ignore_first, rmu_*, undial_beta). The forget rows are ``input_ids`` / ``labels``
    (+ ``ref_logp`` for npo, npo_rt, idkdpo), the retain rows ``retain_*`` (graddiff, npo_rt,
    simnpo, idkdpo, wga, satimp, rmu), IdkDPO's refusals ``idk_*`` (+ ``idk_ref_logp``);
    optional per-example ``weight``. beta defaults to 2.5 for simnpo and 0.1 otherwise;
    forget_coeff / retain_coeff weight the two terms (GradDiff's gamma / alpha, NPO+RT's
    coefficients, SimNPO's lambda). WGA, SatImp and CE-U compute their per-token term inside the
    patched forward (no logits); RMU freezes every parameter but method.rmu_params of
    method.rmu_update_layers when the trainer is built, and keeps frozen copies of the layers it
    steers through (methods.RMUState), not a second model. UNDIAL computes, when the trainer is
    built (so the model must be in its initial state then), the final hidden states of the answer
    tokens of every forget row of train_dataset and eval_dataset and copies the lm_head weight
    (methods.UndialReference), not a second model; rows are matched to them by content.

    One forward over the forget, retain and idk rows of the micro-batch through the patched
    model (no logits); each term is its micro-batch mean and the Trainer divides by the
    gradient accumulation steps (loss_is_scaled_for_ga = False), so accumulation and DDP give
    the mean over micro-batches. The reference columns survive remove_unused_columns.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        args=None,
        *,
        method: str | MethodConfig = "npo",
        beta: float | None = None,
        forget_coeff: float = 1.0,
        retain_coeff: float = 1.0,
        simnpo_gamma: float = 0.0,
        average_logprobs: bool = False,
        impl: str = "auto",
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError("UnlearningTrainer needs a model instance (model_init is not supported)")
        config = _method_config(method, beta, forget_coeff, retain_coeff, simnpo_gamma, average_logprobs)
        self.method_config, self.method = config, method_for(config.name)
        self.patch_handle = patch_model(model, impl=impl)
        self.rmu = None
        if self.method.activations:
            if unwrap(model) is not model and type(model).__module__.startswith("peft"):
                raise ValueError("method 'rmu' trains method.rmu_params directly: pass the model without LoRA adapters")
            seed = args.seed if args is not None else 42
            self.rmu = RMUState(config, unwrap(model), seed=seed)
            self.rmu.select_trainable(unwrap(model))
        _check_columns(config.name, train_dataset=train_dataset, eval_dataset=eval_dataset)
        pad_token_id = default_pad_token_id(processing_class, unwrap(model))
        self.undial = None
        if self.method.reference_hidden:
            datasets = [train_dataset] if train_dataset is not None else []
            if eval_dataset is not None:
                datasets += list(eval_dataset.values()) if isinstance(eval_dataset, Mapping) else [eval_dataset]
            if not datasets or any(dataset_columns(d) is None for d in datasets):
                raise ValueError(
                    "method 'undial' needs train_dataset (a datasets.Dataset or a list of dicts) when the "
                    "trainer is built: it caches the initial model's hidden states of the forget answers then"
                )
            self.undial = _UndialRows(unwrap(model), datasets, pad_token_id, impl)
        if data_collator is None:
            data_collator = UnlearningCollator(pad_token_id=pad_token_id)
        self._fastnpo_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                "UnlearningTrainer does not support nn.DataParallel (several GPUs in one process); "
                "launch with torchrun / accelerate launch, or make one GPU visible"
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["weight", "index"]
        for p in PREFIXES.values():
            extra += [f"{p}{c}" for c in ("input_ids", "attention_mask", "labels", "ref_logp")]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _joint_batch(self, inputs) -> tuple[dict[str, torch.Tensor], dict[str, slice]]:
        """The method's example sets stacked into one right-padded batch, and each set's rows in it."""
        rows, start, ids, masks, labels = {}, 0, [], [], []
        for set_name in self.method.sets:
            p = column_prefix(set_name)
            set_ids = inputs[f"{p}input_ids"]
            mask = inputs.get(f"{p}attention_mask")
            mask = torch.ones_like(set_ids) if mask is None else mask
            set_labels = inputs.get(f"{p}labels")
            if set_labels is None:
                set_labels = set_ids.masked_fill(mask == 0, IGNORE_INDEX)
            ids += set_ids.unbind(0)
            masks += mask.unbind(0)
            labels += set_labels.unbind(0)
            rows[set_name] = slice(start, start + set_ids.shape[0])
            start += set_ids.shape[0]
        batch = {
            "input_ids": pad_right(ids, 0),
            "attention_mask": pad_right(masks, 0),
            "labels": pad_right(labels, IGNORE_INDEX),
        }
        return batch, rows

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        del num_items_in_batch  # every term is a micro-batch mean (see the class docstring)
        name = self.method_config.name
        for column in _required_columns(name):
            if column not in inputs:
                raise _missing_column(column, name)
        batch, rows = self._joint_batch(inputs)
        extra, activations = {}, None
        if self.method.token_term:
            places = None
            if self.undial is not None:
                forget = rows["forget"]
                places = self.undial.places_of(batch["input_ids"][forget], batch["labels"][forget])
            extra["fastnpo_token_term"] = self._token_term(batch, rows["forget"], places)
        if self.rmu is not None:
            with self.rmu.capture(unwrap(model)):
                outputs = model(**batch, use_cache=False, return_sequence_logprobs=True)
            attended = batch["attention_mask"] > 0
            masks = {s: torch.zeros_like(attended) for s in rows}
            for s, r in rows.items():
                masks[s][r] = attended[r]
            activations = self.rmu.terms(masks["forget"], masks["retain"])
        else:
            outputs = model(**batch, use_cache=False, return_sequence_logprobs=True, **extra)
        sequence_logps = getattr(outputs, "sequence_logps", None)
        if sequence_logps is None:
            raise RuntimeError(
                "the model returned no sequence_logps: its fastnpo patch was undone; call "
                "fastnpo.integrations.hf.patch_model(trainer.model) again"
            )
        logps = {s: sequence_logps[r] for s, r in rows.items()}
        counts = {s: outputs.token_counts[r] for s, r in rows.items()}
        ref_logps = {s: inputs[f"{column_prefix(s)}ref_logp"].to(sequence_logps) for s in self.method.ref_sets}
        weights = inputs.get("weight")
        weights = None if weights is None else weights.to(sequence_logps)
        terms = loss_terms(
            self.method_config,
            logps,
            counts,
            ref_logps,
            weights=weights,
            token_term=outputs.token_term if self.method.token_term else None,
            activations=activations,
        )
        loss = sum(term.coeff * term.value for term in terms.values())
        mode = "train" if model.training else "eval"
        for key, term in terms.items():
            self._fastnpo_metrics[mode][key].append(float(term.value.detach()))
        for set_name in self.method.sets:
            self._fastnpo_metrics[mode][f"logps/{set_name}"].append(float(logps[set_name].detach().mean()))
        return (loss, outputs) if return_outputs else loss

    def _token_term(self, batch: dict, forget_rows: slice, places: torch.Tensor | None = None):
        """The per-token methods' forget term, as a function the patched forward calls; places
        (UNDIAL): each forget row's example in the cached reference."""
        config = self.method_config

        def term(token_logps, hidden, weight, targets):
            rows = torch.arange(targets.shape[0], device=targets.device)[:, None]
            owner = torch.where(targets != IGNORE_INDEX, rows, -1)
            scored = scored_targets(config, owner, forget_rows)
            reference = None
            if places is not None:
                owners = owner[scored].cpu() - forget_rows.start
                ref_hidden, ref_weight = self.undial.gather(
                    places[owners], target_ranks(owner)[scored].cpu(), hidden.device
                )
                reference = (ref_hidden.to(hidden.device), ref_weight)
            return forget_token_term(config, token_logps, hidden, weight, targets, scored, reference)

        return term

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._fastnpo_metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        self._fastnpo_metrics[mode].clear()
        super().log(logs, start_time)
