"""patch_model: a Hugging Face causal LM whose forward computes its loss with the fused op, without logits.

Given ``labels``, the patched forward returns the usual token-mean cross-entropy
(``num_items_in_batch`` honoured like transformers' ``ForCausalLMLoss``) from the final hidden
states and the lm_head weight, with ``logits=None``: no [tokens x vocab] tensor is ever
allocated, forward or backward. Without labels the stock forward runs (generation unchanged).
Asked for it, the output also carries per-sequence log-probs (``sequence_logps``, ``token_counts``).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...modeling import (
    LOSS_DESIGNS,
    check_supported,
    decoder,
    example_logprobs,
    head_operands,
    one_pass_loss,
    output_weight,
    row_owner,
    uses_one_pass,
)
from ...ops import IGNORE_INDEX, IMPLS, aligned_labels
from ...ops.checks import check_hidden_and_weight, check_labels

__all__ = ["FusedCausalLMOutput", "PatchHandle", "is_patched", "patch_model", "unpatch_model"]

_ATTR = "_fastnpo_patch"


def unwrap(model: nn.Module) -> nn.Module:
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


# transformers 5.25 renamed the outputs' past_key_values to cache; reading the old name warns.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast from a patched model: logits=None, plus per-sequence log-probs when asked.

    sequence_logps: fp32 [B], summed log-probs of each row's target tokens (differentiable);
    token_counts: int64 [B], the number of target tokens of each row;
    token_term: what the forward keyword ``fastnpo_token_term`` computed (see _loss_forward).
    """

    sequence_logps: torch.FloatTensor | None = None
    token_counts: torch.LongTensor | None = None
    token_term: torch.FloatTensor | None = None


class PatchHandle:
    """What patch_model did to one model; ``undo()`` (or leaving a ``with`` block) reverts it."""

    def __init__(self, model, original, previous, positional, impl, return_sequence_logprobs, filter_eps, loss_design):
        self.model = model
        self.original = original  # the forward we delegate to (bound)
        self.previous = previous  # the instance-level forward we replaced, if any
        self.positional = positional  # parameter names, to turn positional args into keywords
        self.impl = impl
        self.return_sequence_logprobs = return_sequence_logprobs
        self.filter_eps = filter_eps
        self.loss_design = loss_design
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
    handle = unwrap(model).__dict__.get(_ATTR)
    return handle is not None and handle.active


def patch_model(
    model: nn.Module,
    *,
    impl: str = "auto",
    return_sequence_logprobs: bool = False,
    filter_eps="auto",
    loss_design: str = "auto",
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
    loss_design: how the plain loss (no sequence log-probs asked) is computed, as the trainer's
        model.loss_design: "one_pass" (ops.example_loss: logits, loss and both gradients in one
        sweep of the forward, exact: filter_eps unused), "two_call" (token log-probs, gradients in
        the backward), "auto" (one_pass on CUDA, two_call elsewhere).

    Returns a PatchHandle: ``handle.undo()``, ``unpatch_model(model)`` or ``with patch_model(m):``
    restore the stock forward. Patching a patched model updates its settings and returns the same
    handle. Under FSDP2 the loss is computed inside the root module's forward, so the (tied)
    lm_head weight is gathered and its gradient reduced like any other root parameter.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if loss_design not in LOSS_DESIGNS:
        raise ValueError(f"loss_design must be one of {LOSS_DESIGNS}, got {loss_design!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    target = unwrap(model)
    handle = target.__dict__.get(_ATTR)
    if handle is not None:
        handle.impl, handle.filter_eps, handle.loss_design = impl, filter_eps, loss_design
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
        loss_design,
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
    handle = unwrap(model).__dict__.get(_ATTR)
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
    token_term = kwargs.pop("fastnpo_token_term", None)
    sequence_loss = kwargs.pop("fastnpo_sequence_loss", None)
    token_loss = kwargs.pop("fastnpo_token_loss", None)
    token_values = kwargs.pop("fastnpo_token_values", "logprob")
    groups = kwargs.pop("fastnpo_example_groups", None)
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
    extras = (token_term, sequence_loss, token_loss, token_values, groups)
    return _loss_forward(self, handle, kwargs, want or token_term is not None, *extras)


def _loss_forward(
    model,
    handle: PatchHandle,
    kwargs: dict,
    want_sequences: bool,
    token_term=None,
    sequence_loss=None,
    token_loss=None,
    token_values="logprob",
    groups=None,
):
    """The loss from the final hidden states through modeling's shared head functions (the same
    the trainer and the reference pass run). token_term: None, or fn(token_logps [B, T], hidden
    [B, T, D], weight [V, D], targets [B, T], owner [B, T]) -> tensor, computed here, inside the
    forward (under FSDP the lm_head weight is gathered only there): the per-token methods' forget
    term (UnlearningTrainer). sequence_loss: None, or fn(logps [B], counts [B]) -> scalar, a sum of
    per-example terms that replaces the cross-entropy and runs in the one-pass design
    (UnlearningTrainer's separable methods). token_loss: the same with the token log-probs too,
    fn(logps [B], counts [B], token_logps [B, T]), a sum of per-example and per-token terms
    (forward keyword fastnpo_token_loss: WGA, SatImp, CE-U); token_values: what its per-token values
    are (forward keyword fastnpo_token_values: "logprob", or "ce_u" for CE-U's per-token losses).
    groups: int64 [B], a sequence_loss of per-group terms (forward keyword fastnpo_example_groups:
    IdkDPO's and AltPO's pairs, Method.example_groups): the chunks hold whole groups."""
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
    _head_weight(model)  # refuses an adapter or a quantized head on every call: either can be added later
    outputs = decoder(model)(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden, weight = head_operands(model, hidden)
    if shift_labels is not None:
        targets = shift_labels.to(hidden.device).long()
    else:
        targets = aligned_labels(labels.to(hidden.device), True, ignore_index)
    check_hidden_and_weight(hidden, weight, exact_dim=3)
    check_labels(targets, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    if ignore_index != IGNORE_INDEX:  # the shared head functions know one "no target" value
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    if num_items is None:
        denominator = mask.sum()
    elif isinstance(num_items, torch.Tensor):
        denominator = num_items.to(hidden.device)
    else:
        denominator = num_items

    sequence_logps = token_counts = None
    examples = targets.shape[0]
    if sequence_loss is None and not want_sequences and uses_one_pass(handle.loss_design, hidden.device):

        def sequence_loss(logps, counts):  # the token-mean cross-entropy is a sum of per-row terms
            return -logps.sum() / denominator

    if sequence_loss is not None or token_loss is not None:
        owner, level = row_owner(targets), token_loss is not None
        loss_fn = token_loss if level else sequence_loss
        per_token = dict(token_level=level, token_values=token_values, groups=groups)
        loss = one_pass_loss(hidden, weight, targets, owner, examples, loss_fn, impl=handle.impl, **per_token)
    else:
        sequence_logps, token_counts, token_term = example_logprobs(
            hidden, weight, targets, impl=handle.impl, filter_eps=handle.filter_eps, token_term=token_term
        )
        loss = -sequence_logps.sum() / denominator
        if not want_sequences:
            sequence_logps = token_counts = None
    out = FusedCausalLMOutput(
        loss=loss,
        logits=None,
        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD, None)},
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        sequence_logps=sequence_logps,
        token_counts=token_counts,
        token_term=token_term,
    )
    return out if return_dict else out.to_tuple()
