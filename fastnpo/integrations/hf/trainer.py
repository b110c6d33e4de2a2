"""UnlearningTrainer: a transformers.Trainer minimising a fastnpo unlearning loss on cached reference log-probs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from transformers import Trainer

from ...methods import METHOD_FIELDS, METHODS, MethodConfig, PrepareInputs, TermInputs, method_for, scored_positions
from ...modeling import LOSS_DESIGNS, SequenceLogprobModel, output_weight, row_owner, uses_one_pass
from ...ops import IGNORE_INDEX, aligned_labels, example_of_positions
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


def _method_config(method, beta, forget_coeff, retain_coeff, average_logprobs, options: dict) -> MethodConfig:
    """method: a MethodConfig, or a name with the keyword values (beta None: the method's default;
    options: any other MethodConfig key, e.g. a method's own parameter)."""
    if isinstance(method, MethodConfig):
        if options:
            raise ValueError(f"method is a MethodConfig: set {sorted(options)} in it")
        config = method
    else:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        config = MethodConfig(
            name=method,
            beta=beta,
            forget_coeff=forget_coeff,
            retain_coeff=retain_coeff,
            average_logprobs=average_logprobs,
            **options,
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


def _example_key(input_ids, labels) -> tuple | None:
    """What identifies a forget row for the state a method prepared per example: its input ids up
    to its last target and the target positions (what the model computes from them depends on
    nothing else); None without a target. The same for a dataset row and for the row right-padded
    in a batch."""
    input_ids, labels = [int(t) for t in input_ids], [int(t) for t in labels]
    positions = tuple(t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX)
    return (tuple(input_ids[: positions[-1] + 1]), positions) if positions else None


class _ExampleKeys:
    """The forget rows of the train and eval datasets, each once, as items indexed in order of
    first appearance (what Method.prepare gets), and each row's index by content (_example_key):
    rows arrive shuffled and without an index column."""

    def __init__(self, datasets: list):
        self.items, self.places = [], {}
        for dataset in datasets:
            columns = dataset_columns(dataset)
            for item in _reference_items(dataset, columns, ["forget"])["forget"]:
                key = _example_key(item["input_ids"], item["labels"])
                if key is not None and key not in self.places:
                    self.places[key] = len(self.items)
                    self.items.append({**item, "index": len(self.items)})

    def places_of(self, input_ids: torch.Tensor, labels: torch.Tensor, method) -> torch.Tensor:
        """[B]: each forget row's index among the items (-1 for a row without targets)."""
        places = []
        for ids, row_labels in zip(input_ids.tolist(), labels.tolist(), strict=True):
            key = _example_key(ids, row_labels)
            if key is not None and key not in self.places:
                raise ValueError(
                    f"method {method.name!r}: a forget row that was not in train_dataset or eval_dataset when the "
                    f"trainer was built has no {method.prepared_what}; build a new UnlearningTrainer"
                )
            places.append(-1 if key is None else self.places[key])
        return torch.tensor(places, dtype=torch.long)


def _weighted_sum(terms: dict) -> torch.Tensor:
    """The loss of micro-batch-mean terms: each times its coefficient (see UnlearningTrainer)."""
    return sum(term.coeff * term.value for term in terms.values())


class UnlearningTrainer(Trainer):
    """transformers.Trainer minimising a fastnpo unlearning loss on cached reference log-probs.

    method: a `method.name` (fastnpo.methods.METHODS; docs/methods.md) with beta (None: the
    method's default), forget_coeff / retain_coeff (the forget and retain terms' weights),
    average_logprobs and any other MethodConfig key as keywords (e.g. a method's own parameter),
    or a MethodConfig. The forget rows are ``input_ids`` / ``labels`` (+ ``ref_logp`` when the
    method caches the forget set's reference log-probs), the other sets the method reads under
    their prefix (``retain_*``, ``idk_*``, + ``idk_ref_logp``); optional per-example ``weight``.
    A method that builds something once (Method.prepare) builds it when the trainer is built,
    from the model as it is then (its initial state): frozen copies of a few layers, or the
    initial model's hidden states of the forget answers of every forget row of train_dataset and
    eval_dataset (rows are matched to them by content), not a second model. A method that trains
    a subset of the parameters freezes the others then. Token-level forget terms are computed
    inside the patched forward (no logits).

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
        average_logprobs: bool = False,
        impl: str = "auto",
        loss_design: str = "auto",
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError("UnlearningTrainer needs a model instance (model_init is not supported)")
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in METHOD_FIELDS}
        config = _method_config(method, beta, forget_coeff, retain_coeff, average_logprobs, options)
        self.method_config, self.method = config, method_for(config.name)
        if loss_design not in LOSS_DESIGNS:
            raise ValueError(f"loss_design must be one of {LOSS_DESIGNS}, got {loss_design!r}")
        if loss_design == "one_pass" and not self.method.one_pass:
            raise ValueError(
                f"loss_design='one_pass' needs a loss that is a sum of per-example or per-token terms; method "
                f"{config.name!r}'s is not: use loss_design='auto' or 'two_call'"
            )
        self.loss_design = loss_design
        self.patch_handle = patch_model(model, impl=impl)
        if self.method.lora_conflict and unwrap(model) is not model and type(model).__module__.startswith("peft"):
            raise ValueError(f"{self.method.lora_conflict}: pass the model without LoRA adapters")
        _check_columns(config.name, train_dataset=train_dataset, eval_dataset=eval_dataset)
        pad_token_id = default_pad_token_id(processing_class, unwrap(model))
        self.examples = None
        if self.method.prepares_examples:
            datasets = [train_dataset] if train_dataset is not None else []
            if eval_dataset is not None:
                datasets += list(eval_dataset.values()) if isinstance(eval_dataset, Mapping) else [eval_dataset]
            if not datasets or any(dataset_columns(d) is None for d in datasets):
                raise ValueError(
                    f"method {config.name!r} needs train_dataset (a datasets.Dataset or a list of dicts) when the "
                    f"trainer is built: it builds its {self.method.prepared_what} from the initial model then"
                )
            self.examples = _ExampleKeys(datasets)
        self.method_state = self._prepare(unwrap(model), args, pad_token_id, impl)
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

    @torch.no_grad()
    def _prepare(self, model, args, pad_token_id: int, impl: str):
        """What the method builds once (Method.prepare), from the model in its initial state."""

        def target_hidden_states(items):
            wrapper = SequenceLogprobModel(model, impl=impl)
            return item_target_hidden_states(wrapper, items, pad_token_id, batch_size=8)

        seed = args.seed if args is not None else 42
        forget = self.examples.items if self.examples is not None else []
        inputs = PrepareInputs(model, seed, forget, target_hidden_states, output_weight(model))
        return self.method.prepare(self.method_config, inputs)

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
        name, method = self.method_config.name, self.method
        for column in _required_columns(name):
            if column not in inputs:
                raise _missing_column(column, name)
        batch, rows = self._joint_batch(inputs)
        ref_logps = {s: inputs[f"{column_prefix(s)}ref_logp"].float() for s in method.ref_sets}
        weights = inputs.get("weight")
        weights = None if weights is None else weights.float()
        if uses_one_pass(self.loss_design, batch["input_ids"].device, method.one_pass):
            outputs, loss, terms, logps = self._one_pass_loss(model, batch, rows, ref_logps, weights)
        else:
            outputs, terms, logps = self._two_call_terms(model, batch, rows, ref_logps, weights)
            loss = _weighted_sum(terms)
        mode = "train" if model.training else "eval"
        for key, term in terms.items():
            self._fastnpo_metrics[mode][key].append(float(term.value.detach()))
        for set_name in method.sets:
            self._fastnpo_metrics[mode][f"logps/{set_name}"].append(float(logps[set_name].detach().mean()))
        return (loss, outputs) if return_outputs else loss

    def _one_pass_loss(self, model, batch, rows, ref_logps, weights):
        """(outputs, loss, terms, log-probs by set) from the patched forward in the one-pass design
        (the method's loss is a sum of per-example terms, or also of per-token ones: token_separable):
        its loss closure is evaluated once per chunk and last on the complete log-probs; the terms
        and log-probs kept are that last call's."""
        method, config = self.method, self.method_config
        scored, scored_count = None, 0
        if method.token_separable:  # where the forget term scores and how often: once, not per chunk
            owner = row_owner(aligned_labels(batch["labels"], True, IGNORE_INDEX))
            scored = scored_positions(method.skipped_targets(config), owner, rows["forget"])
            scored_count = int(scored.sum())
        loss_of, seen = method.one_pass_loss(
            config, rows, ref_logps, weights, _weighted_sum, scored=scored, scored_count=scored_count
        )
        if scored is None:
            groups = method.example_groups(rows)
            outputs = model(**batch, use_cache=False, fastnpo_sequence_loss=loss_of, fastnpo_example_groups=groups)
        else:
            values = method.one_pass_token_values
            outputs = model(**batch, use_cache=False, fastnpo_token_loss=loss_of, fastnpo_token_values=values)
        return outputs, outputs.loss, seen["terms"], seen["logps"]

    def _two_call_terms(self, model, batch, rows, ref_logps, weights):
        """(outputs, terms, log-probs by set) from the per-example log-probs of the patched forward
        (gradients in the backward), with what else the method's forward needs (per-token terms,
        activations)."""
        method, state = self.method, self.method_state
        example_index = None
        if self.examples is not None:  # each row's example in what the method prepared (-1: none)
            forget = rows["forget"]
            example_index = torch.full((batch["input_ids"].shape[0],), -1, dtype=torch.long)
            example_index[forget] = self.examples.places_of(batch["input_ids"][forget], batch["labels"][forget], method)
        extra = {}
        if method.token_level:
            extra["fastnpo_token_term"] = self._token_term(rows["forget"], example_index)
        with method.capture(state, unwrap(model)):
            outputs = model(**batch, use_cache=False, return_sequence_logprobs=True, **extra)
        activations = method.activation_terms(state, example_of_positions(batch), rows, batch["labels"])
        sequence_logps = getattr(outputs, "sequence_logps", None)
        if sequence_logps is None:
            raise RuntimeError(
                "the model returned no sequence_logps: its fastnpo patch was undone; call "
                "fastnpo.integrations.hf.patch_model(trainer.model) again"
            )
        logps = {s: sequence_logps[r] for s, r in rows.items()}
        counts = {s: outputs.token_counts[r] for s, r in rows.items()}
        token_term = outputs.token_term if method.token_level else None
        inputs = TermInputs(logps, counts, ref_logps, weights, None, token_term, activations)
        return outputs, method.terms(self.method_config, inputs), logps

    def _token_term(self, forget_rows: slice, example_index: torch.Tensor | None = None):
        """The method's token-level forget term, as a function the patched forward calls;
        example_index: each row's example in what the method prepared (Method.forget_term)."""
        config, method, state = self.method_config, self.method, self.method_state

        def term(token_logps, hidden, weight, targets, owner):
            return method.forget_term(
                config, state, token_logps, hidden, weight, targets, owner, forget_rows, example_index
            )

        return term

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._fastnpo_metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        self._fastnpo_metrics[mode].clear()
        super().log(logs, start_time)
