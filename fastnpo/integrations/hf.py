"""Hugging Face drop-ins: a patched causal-LM forward, an unlearning Trainer, reference log-prob columns.

Three routes, from the least to the most invasive:

- ``patch_model(model)``: the model's forward, given ``labels``, returns the usual token-mean
  cross-entropy (``num_items_in_batch`` honoured like transformers' ``ForCausalLMLoss``) computed by
  fastnpo's fused linear + log-softmax op, with ``logits=None``: no [tokens x vocab] tensor is ever
  allocated, forward or backward. Without labels the stock forward runs (generation unchanged).
  Asked for it, the output also carries per-sequence log-probs (``sequence_logps``, ``token_counts``).
  Works with any ``transformers.Trainer`` (and PEFT/LoRA) as is.
- ``UnlearningTrainer``: a ``transformers.Trainer`` that minimises a fastnpo loss (NPO, GA, GradDiff,
  NPO+RT, SimNPO, IdkDPO) on datasets whose cached reference log-probs travel as columns
  (``ref_logp``), attached once by ``add_reference_logprobs``; no reference model in memory.
- ``add_reference_logprobs`` / ``pair_with_retain`` / ``UnlearningCollator``: the data side.

Dataset layout of the unlearning trainer (one row per forget example; HF label convention):
``input_ids``, ``labels`` (-100 on prompt tokens; default = input_ids), optional ``attention_mask``,
``ref_logp`` (summed log-prob of the labels under the reference model), optional ``weight``; the retain
example paired with it as ``retain_input_ids`` / ``retain_labels``; IdkDPO's refusal as ``idk_input_ids``
/ ``idk_labels`` / ``idk_ref_logp``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..methods import METHODS, MethodConfig, loss_terms, method_for
from ..modeling import SequenceLogprobModel, check_supported, decoder, output_weight
from ..ops import IGNORE_INDEX, IMPLS, aligned_labels, fused_sequence_loss, token_logprobs
from ..ops.checks import check_hidden_and_weight, check_labels
from ..refcache import reference_logprobs

__all__ = [
    "FusedCausalLMOutput",
    "PatchHandle",
    "UnlearningCollator",
    "UnlearningTrainer",
    "add_reference_logprobs",
    "column_prefix",
    "is_patched",
    "pair_with_retain",
    "patch_model",
    "unpatch_model",
]

logger = logging.getLogger(__name__)

_ATTR = "_fastnpo_patch"


# ============================================================================== model patch


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DataParallel / PEFT wrappers (the one to patch)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    if callable(get_base) and type(model).__module__.startswith("peft"):
        model = get_base()
    return model


def _head_weight(model: nn.Module) -> torch.Tensor:
    """lm_head weight [V, D], refusing heads that are not a plain linear map (LoRA on lm_head, quantized)."""
    try:
        weight = output_weight(model)
    except ValueError as error:
        raise ValueError(
            f"{error}. fastnpo computes the loss from the final hidden states and the lm_head weight: use a "
            "*ForCausalLM model (AutoModelForCausalLM), not the bare backbone (AutoModel); a custom "
            "model must implement get_output_embeddings() returning its bias-free nn.Linear lm_head"
        ) from None
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise NotImplementedError(
            "the lm_head carries a PEFT adapter: its output is no longer hidden @ lm_head.weight.T, which is "
            "what the fused op computes; remove 'lm_head' from LoraConfig.target_modules"
        )
    if not weight.dtype.is_floating_point:
        raise NotImplementedError(
            f"the lm_head weight is {weight.dtype} (quantized?); the fused op needs a float lm_head weight"
        )
    return weight


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast from a patched model: logits=None, plus per-sequence log-probs when asked.

    sequence_logps: fp32 [B], summed log-probs of each row's target tokens (differentiable);
    token_counts: int64 [B], the number of target tokens of each row.
    """

    sequence_logps: torch.FloatTensor | None = None
    token_counts: torch.LongTensor | None = None


class PatchHandle:
    """What patch_model did to one model; ``undo()`` (or leaving a ``with`` block) reverts it."""

    def __init__(self, model, original, previous, positional, impl, return_sequence_logprobs, filter_eps):
        self.model = model
        self.original = original  # the forward we delegate to (bound)
        self.previous = previous  # the instance-level forward we replaced, if any
        self.positional = positional  # parameter names, to turn positional args into keywords
        self.impl = impl
        self.return_sequence_logprobs = return_sequence_logprobs
        self.filter_eps = filter_eps
        self.installed = None
        self.active = True

    def undo(self) -> None:
        """Restore the stock forward. Idempotent."""
        model = self.model
        if not self.active:
            return
        self.active = False
        if model.__dict__.get("forward") is self.installed:
            if self.previous is not None:
                object.__setattr__(model, "forward", self.previous)
            else:
                del model.__dict__["forward"]
            model.__dict__.pop(_ATTR, None)
        else:
            # Someone (accelerate's autocast wrapper, TRL's fused head) wrapped our forward after we
            # installed it: keep the chain, which now passes straight through to the stock forward.
            warnings.warn(
                f"{type(model).__name__}.forward was wrapped after patch_model; the fastnpo patch is "
                "deactivated (the wrapper now reaches the stock forward) but the wrapper stays",
                stacklevel=2,
            )

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"PatchHandle({type(self.model).__name__}, impl={self.impl!r}, {state})"


def is_patched(model: nn.Module) -> bool:
    handle = _unwrap(model).__dict__.get(_ATTR)
    return handle is not None and handle.active


def patch_model(
    model: nn.Module,
    *,
    impl: str = "auto",
    return_sequence_logprobs: bool = False,
    filter_eps="auto",
) -> PatchHandle:
    """Make a Hugging Face causal LM compute its loss with fastnpo's fused op, without logits.

    After patching, ``model(input_ids, attention_mask, labels=labels)`` returns the same ``loss``
    as the stock model (token-mean cross-entropy over the targets ``labels[:, 1:] != -100``; with
    ``num_items_in_batch`` the sum divided by it, as transformers' Trainer uses it for gradient
    accumulation; ``shift_labels`` and ``ignore_index`` also honoured) and ``logits=None``: the
    [tokens x vocab] logits are never allocated, forward or backward. With
    ``return_sequence_logprobs=True`` (here, or per call as a forward keyword) the output also holds
    ``sequence_logps`` [B] (summed target log-probs per row, differentiable) and ``token_counts`` [B].
    Calls without labels (or with ``logits_to_keep``) run the stock forward unchanged.

    model: a transformers *ForCausalLM (a PEFT model or DDP wrapper is unwrapped: the transformers
        model inside is patched). Refused: logit softcapping / scaling, a bias or a LoRA adapter on
        the lm_head, a model without an output embedding. Tied embeddings are fine.
    impl, filter_eps: as in fastnpo.token_logprobs ("auto": triton on CUDA, chunked torch on CPU).

    Returns a PatchHandle: ``handle.undo()``, ``unpatch_model(model)`` or ``with patch_model(m):``
    restore the stock forward. Patching a patched model updates its settings and returns the same
    handle. Under FSDP2 the loss is computed inside the root module's forward, so the (tied)
    lm_head weight is gathered and its gradient reduced like any other root parameter.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    target = _unwrap(model)
    handle = target.__dict__.get(_ATTR)
    if handle is not None:
        handle.impl, handle.filter_eps = impl, filter_eps
        handle.return_sequence_logprobs = return_sequence_logprobs
        handle.active = True  # re-activates a patch that was undone while wrapped by someone else
        return handle
    check_supported(target)
    _head_weight(target)
    decoder(target)
    original = target.forward
    signature = inspect.signature(original)
    if "labels" not in signature.parameters:
        raise TypeError(f"{type(target).__name__}.forward takes no `labels`: not a causal LM forward")
    positional = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    handle = PatchHandle(
        target,
        original,
        target.__dict__.get("forward"),
        positional,
        impl,
        return_sequence_logprobs,
        filter_eps,
    )

    # Keep the stock signature: Trainer picks dataset columns and loss kwargs from it, and
    # generate() validates its model kwargs against it.
    @functools.wraps(getattr(original, "__func__", type(target).forward))
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    handle.installed = types.MethodType(forward, target)
    object.__setattr__(target, "forward", handle.installed)
    target.__dict__[_ATTR] = handle
    return handle


def unpatch_model(model: nn.Module) -> bool:
    """Undo patch_model; returns whether the model was patched."""
    handle = _unwrap(model).__dict__.get(_ATTR)
    if handle is None or not handle.active:
        return False
    handle.undo()
    return True


def _is_zero(logits_to_keep) -> bool:
    """logits_to_keep asks for no slicing (0, the default, or None)."""
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def _patched_forward(self, *args, **kwargs):
    handle = self.__dict__.get(_ATTR)
    want = kwargs.pop("return_sequence_logprobs", None)
    if handle is None:  # a copy made without the handle: behave like the class
        return type(self).forward(self, *args, **kwargs)
    if len(args) > len(handle.positional):
        raise TypeError(f"forward() takes {len(handle.positional)} positional arguments, got {len(args)}")
    for name, value in zip(handle.positional, args, strict=False):
        if name in kwargs:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        kwargs[name] = value
    if not handle.active or kwargs.get("labels") is None or not _is_zero(kwargs.get("logits_to_keep")):
        return handle.original(**kwargs)
    want = handle.return_sequence_logprobs if want is None else bool(want)
    return _loss_forward(self, handle, kwargs, want)


def _loss_forward(model, handle: PatchHandle, kwargs: dict, want_sequences: bool):
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)
    config = getattr(model, "config", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if kwargs.get("output_router_logits", getattr(text_config, "output_router_logits", False)):
        raise NotImplementedError(
            "output_router_logits (the MoE load-balancing loss) is not supported by the fastnpo patch; "
            "set config.output_router_logits=False or unpatch the model"
        )
    weight = _head_weight(model)
    outputs = decoder(model)(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if weight.dtype != hidden.dtype:  # autocast hands back bf16 hidden states
        weight = weight.to(hidden.dtype)
    if weight.device != hidden.device:  # device_map: the backbone may end elsewhere than the head
        hidden = hidden.to(weight.device)
    if shift_labels is not None:
        targets = shift_labels.to(hidden.device).long()
    else:
        targets = aligned_labels(labels.to(hidden.device), True, ignore_index)
    check_hidden_and_weight(hidden, weight, exact_dim=3)
    check_labels(targets, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    batch, length, dim = hidden.shape
    mask = targets != ignore_index
    if num_items is None:
        denominator = mask.sum()
    elif isinstance(num_items, torch.Tensor):
        denominator = num_items.to(hidden.device)
    else:
        denominator = num_items

    sequence_logps = token_counts = None
    if want_sequences:
        tokens = token_logprobs(
            hidden, weight, targets, ignore_index=ignore_index, impl=handle.impl, filter_eps=handle.filter_eps
        )
        sequence_logps = tokens.sum(dim=1)
        token_counts = mask.sum(dim=1)
        loss = -sequence_logps.sum() / denominator
    else:
        loss = fused_sequence_loss(
            hidden.reshape(batch * length, dim),
            weight,
            targets.reshape(-1),
            length,
            lambda logps: -logps.sum() / denominator,
            ignore_index=ignore_index,
            impl=handle.impl,
            filter_eps=handle.filter_eps,
        )
    out = FusedCausalLMOutput(
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        sequence_logps=sequence_logps,
        token_counts=token_counts,
    )
    return out if return_dict else out.to_tuple()


# ============================================================================== data

_PREFIXES = {"forget": "", "retain": "retain_", "idk": "idk_"}


def column_prefix(set_name: str) -> str:
    """Column prefix of an example set: forget -> "", retain -> "retain_", idk -> "idk_"."""
    if set_name not in _PREFIXES:
        raise ValueError(f"set must be one of {sorted(_PREFIXES)}, got {set_name!r}")
    return _PREFIXES[set_name]


def _columns(dataset) -> list[str] | None:
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


def _as_list(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


def _rows(dataset, columns: Sequence[str]) -> dict[str, list]:
    if hasattr(dataset, "column_names"):
        return {c: dataset[c] for c in columns}
    return {c: [row[c] for row in dataset] for c in columns}


@dataclass
class UnlearningCollator:
    """Pads every example set of a batch (forget, retain_*, idk_*) to one width and keeps the
    reference columns.

    Returns int64 ``{p}input_ids``, ``{p}attention_mask``, ``{p}labels`` (-100 on padding; the
    input ids where a row has no labels) [B, T] for each prefix p present, and fp32 ``*ref_logp``
    and ``weight`` [B], int64 ``index`` [B] when present. Other columns (text) are dropped.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("UnlearningCollator needs at least one example")
        first = examples[0]
        prefixes = [p for p in _PREFIXES.values() if f"{p}input_ids" in first]
        if not prefixes:
            raise ValueError(f"examples have no input_ids column; columns: {sorted(first)}")
        ids = {p: [_as_list(ex[f"{p}input_ids"]) for ex in examples] for p in prefixes}
        width = max(len(row) for rows in ids.values() for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for p in prefixes:
            input_ids = torch.full((len(examples), width), int(self.pad_token_id), dtype=torch.long)
            attention = torch.zeros((len(examples), width), dtype=torch.long)
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, (example, tokens) in enumerate(zip(examples, ids[p], strict=True)):
                n = len(tokens)
                input_ids[row, :n] = torch.tensor(tokens, dtype=torch.long)
                given = example.get(f"{p}labels")
                target = tokens if given is None else _as_list(given)
                if len(target) != n:
                    raise ValueError(f"example {row}: {p}labels has {len(target)} entries, {p}input_ids {n}")
                labels[row, :n] = torch.tensor(target, dtype=torch.long)
                mask = example.get(f"{p}attention_mask")
                attention[row, :n] = 1 if mask is None else torch.tensor(_as_list(mask), dtype=torch.long)
            batch[f"{p}input_ids"] = input_ids
            batch[f"{p}attention_mask"] = attention
            batch[f"{p}labels"] = labels
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
            name = f"retain_{column}"
            if name in out.column_names:
                out = out.remove_columns(name)
            out = out.add_column(name, picked[column])
    return out


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
        exists (the sets whose reference log-probs NPO / NPO+RT / IdkDPO read).
    cache_dir: optional folder for fastnpo's on-disk reference cache (fastnpo.refcache), keyed by
        fingerprints of the model weights, the tokenizer and the tokenized examples: a rerun on
        the same inputs loads the numbers instead of recomputing them.
    Returns a new dataset (or list) with the columns added (replaced if present).
    """
    columns = _columns(dataset)
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
    base = _unwrap(model) if not type(model).__module__.startswith("peft") else model
    SequenceLogprobModel(base, impl=impl)  # refuses unsupported models before any work
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(base, "config", None), "pad_token_id", None)
    pad_token_id = 0 if pad_token_id is None else int(pad_token_id)

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

    ref, _ = reference_logprobs(
        base,
        tokenizer,
        items,  # rows[i]["index"] == i: row order
        pad_token_id=pad_token_id,
        batch_size=batch_size,
        impl=impl,
        cache_dir=cache_dir,
        log=log or logger.info,
    )
    logps = ref.logps

    out = dataset
    for name in sets:
        column = f"{column_prefix(name)}ref_logp"
        values = logps[name].tolist()
        if hasattr(out, "add_column"):
            if column in out.column_names:
                out = out.remove_columns(column)
            out = out.add_column(column, values)
        else:
            out = [{**row, column: value} for row, value in zip(out, values, strict=True)]
    return out


# ============================================================================== trainer


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


class UnlearningTrainer(Trainer):
    """transformers.Trainer minimising a fastnpo unlearning loss on cached reference log-probs.

    method: ga | graddiff | npo | npo_rt | simnpo | idkdpo | finetune (fastnpo.methods). The
    forget rows are ``input_ids`` / ``labels`` (+ ``ref_logp`` for npo, npo_rt, idkdpo), the
    retain rows ``retain_*`` (graddiff, npo_rt, simnpo, idkdpo), IdkDPO's refusals ``idk_*``
    (+ ``idk_ref_logp``); optional per-example ``weight``. beta defaults to 2.5 for simnpo
    and 0.1 otherwise; forget_coeff / retain_coeff weight the two terms (GradDiff's gamma /
    alpha, NPO+RT's coefficients, SimNPO's lambda).

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
        if isinstance(method, MethodConfig):
            config = method
        else:
            if method not in METHODS:
                raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
            if beta is None:
                beta = 2.5 if method == "simnpo" else 0.1
            config = MethodConfig(
                name=method,
                beta=beta,
                forget_coeff=forget_coeff,
                retain_coeff=retain_coeff,
                simnpo_gamma=simnpo_gamma,
                average_logprobs=average_logprobs,
            )
        spec = method_for(config.name)
        if spec.live_reference:
            raise NotImplementedError(
                f"method {config.name!r} needs the reference model's full distribution (its KL term), "
                "which cached log-prob columns cannot give; use fastnpo's own trainer (`fastnpo train`)"
            )
        self.method_config, self.method = config, spec
        self.patch_handle = patch_model(model, impl=impl)
        for split, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            parts = data.values() if isinstance(data, Mapping) else [data]
            for part in parts:
                columns = _columns(part) if part is not None else None
                for column in _required_columns(config.name) if columns is not None else ():
                    if column not in columns:
                        error = _missing_column(column, config.name)
                        raise ValueError(f"{split}: {error}")
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            if pad is None:
                pad = getattr(getattr(_unwrap(model), "config", None), "pad_token_id", None)
            data_collator = UnlearningCollator(pad_token_id=0 if pad is None else int(pad))
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
        for set_name in _PREFIXES:
            p = column_prefix(set_name)
            extra += [f"{p}{c}" for c in ("input_ids", "attention_mask", "labels", "ref_logp")]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        del num_items_in_batch  # every term is a micro-batch mean (see the class docstring)
        name = self.method_config.name
        for column in _required_columns(name):
            if column not in inputs:
                raise _missing_column(column, name)
        rows, start, parts = {}, 0, []
        for set_name in self.method.sets:
            p = column_prefix(set_name)
            ids = inputs[f"{p}input_ids"]
            mask = inputs.get(f"{p}attention_mask")
            labels = inputs.get(f"{p}labels")
            if mask is None:
                mask = torch.ones_like(ids)
            if labels is None:
                labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            parts.append((ids, mask, labels))
            rows[set_name] = slice(start, start + ids.shape[0])
            start += ids.shape[0]
        width = max(ids.shape[1] for ids, _, _ in parts)

        def pad(t, value):
            return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        input_ids = torch.cat([pad(ids, 0) for ids, _, _ in parts])
        attention_mask = torch.cat([pad(mask, 0) for _, mask, _ in parts])
        labels = torch.cat([pad(lab, IGNORE_INDEX) for _, _, lab in parts])
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            return_sequence_logprobs=True,
        )
        sequence_logps = getattr(outputs, "sequence_logps", None)
        if sequence_logps is None:
            raise RuntimeError(
                "the model returned no sequence_logps: its fastnpo patch was undone; call "
                "fastnpo.integrations.hf.patch_model(trainer.model) again"
            )
        counts_all = outputs.token_counts
        logps = {s: sequence_logps[r] for s, r in rows.items()}
        counts = {s: counts_all[r] for s, r in rows.items()}
        ref_logps = {s: inputs[f"{column_prefix(s)}ref_logp"].to(sequence_logps) for s in self.method.ref_sets}
        weights = inputs.get("weight")
        weights = None if weights is None else weights.to(sequence_logps)
        terms = loss_terms(self.method_config, logps, counts, ref_logps, weights=weights)
        loss = sum(term.coeff * term.value for term in terms.values())
        mode = "train" if model.training else "eval"
        for key, term in terms.items():
            self._fastnpo_metrics[mode][key].append(float(term.value.detach()))
        for set_name in self.method.sets:
            self._fastnpo_metrics[mode][f"logps/{set_name}"].append(float(logps[set_name].detach().mean()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._fastnpo_metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        self._fastnpo_metrics[mode].clear()
        super().log(logs, start_time)
