"""RMU (representation misdirection for unlearning; WMDP, Li et al. 2024, arXiv 2403.03218).

The output of decoder layer rmu_layer (7) is steered toward rmu_steering_coeff (20) times a fixed
random unit vector on forget data and kept at the frozen model's on retain data (weight
rmu_alpha = 100, times retain_coeff); only the parameters named rmu_params
(["mlp.down_proj.weight"]) of the layers rmu_update_layers ([5, 6, 7]) train. Each term is a mean
of the squared distance over the D features and over the positions chosen by rmu_positions:

- "attended" (the default, fastnpo's benchmark convention): every attended position of the set
  (prompt and answer, no padding), pooled over the set's examples (unit "<set>_positions");
- "labelled" (open-unlearning's `RMU.compute_activation_loss`): the labelled positions of each
  example (labels != -100: the answer and its EOS), averaged per example, then over the set's
  examples (unit "<set>_examples"). An example with no labelled position contributes 0 (where
  open-unlearning would give NaN).
"""

import copy
import re
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from ..config import ConfigError, require
from ..ops import IGNORE_INDEX
from .base import Method, MethodMemory, PrepareInputs, Term, TermInputs


class RMU(Method):
    name, label = "rmu", "RMU"
    sets = ("forget", "retain")
    captures_activations = True
    lora_conflict = "method rmu trains method.rmu_params directly"
    parameters: ClassVar[dict] = {
        "rmu_layer": 7,
        "rmu_update_layers": [5, 6, 7],
        "rmu_params": ["mlp.down_proj.weight"],
        "rmu_steering_coeff": 20.0,
        "rmu_alpha": 100.0,
        "rmu_positions": "attended",
    }

    def check(self, config) -> None:
        c = config.rmu_steering_coeff
        require(c > 0, "method.rmu_steering_coeff", "must be > 0", c)
        require(config.rmu_alpha >= 0, "method.rmu_alpha", "must be >= 0", config.rmu_alpha)
        require(config.rmu_layer >= 0, "method.rmu_layer", "must be >= 0 (a decoder layer index)", config.rmu_layer)
        layers = list(config.rmu_update_layers)
        message = f"must be a non-empty list of distinct layer indices in [0, method.rmu_layer={config.rmu_layer}]"
        fine = bool(layers) and len(set(layers)) == len(layers) and all(0 <= i <= config.rmu_layer for i in layers)
        require(fine, "method.rmu_update_layers", message, layers)
        require(bool(config.rmu_params), "method.rmu_params", "must name at least one parameter", config.rmu_params)
        positions = config.rmu_positions
        require(positions in RMU_POSITIONS, "method.rmu_positions", f"must be one of {list(RMU_POSITIONS)}", positions)

    def for_layers(self, layers: int) -> dict:
        """The defaults name layers 5-7 of a 32-layer model: on a small model (the demo's), steer the
        last decoder layer's output and train every layer's down_proj (3 of 32 layers' share is not
        possible with two)."""
        return {"rmu_layer": layers - 1, "rmu_update_layers": list(range(layers))}

    def prepare(self, config, inputs: PrepareInputs) -> "RMUState":
        """Frozen copies of the layers it steers through and the fixed steering vector, from the
        initial model; every parameter but the chosen ones frozen. ValueError on a model that
        does not fit the config."""
        state = RMUState(config, inputs.model, seed=inputs.seed)
        state.select_trainable(inputs.model)
        return state

    def capture(self, state: "RMUState", model: nn.Module):
        return state.capture(model)

    def activation_terms(self, state: "RMUState", owner: torch.Tensor, rows: dict[str, slice], labels: torch.Tensor):
        """rmu_positions "labelled" reads the micro-batch's labels [R, L]."""
        if state.positions == "labelled":
            return state.example_terms(owner, rows, labels)
        masks = {name: (owner >= r.start) & (owner < r.stop) for name, r in rows.items()}
        return state.terms(masks["forget"], masks.get("retain"))

    def terms(self, config, x: TermInputs) -> dict[str, Term]:
        if x.activations is None:
            raise ValueError("method rmu needs the steered layer's activation terms (RMUState.terms)")
        unit = RMU_POSITIONS[config.rmu_positions]
        return {
            "rmu_forget": Term(x.activations["forget"], f"forget_{unit}", config.forget_coeff),
            "rmu_retain": Term(x.activations["retain"], f"retain_{unit}", config.rmu_alpha * config.retain_coeff),
        }

    def memory(self, config, model: nn.Module, layers: nn.ModuleList) -> MethodMemory:
        """The parameters it trains, its frozen copies of layers first updated .. rmu_layer, and
        the layers its backward runs through."""
        if config.rmu_layer >= len(layers):
            raise ConfigError(f"method.rmu_layer: the model has {len(layers)} decoder layers, got {config.rmu_layer}")
        pattern = rmu_trainable_pattern(config)
        trainable = sum(p.numel() for name, p in model.named_parameters() if pattern.match(name))
        if not trainable:
            named = config.rmu_update_layers
            raise ConfigError(f"method.rmu_params: no parameter {config.rmu_params} in decoder layers {named}")
        copied = layers[min(config.rmu_update_layers) : config.rmu_layer + 1]
        frozen = sum(p.numel() for layer in copied for p in layer.parameters())
        return MethodMemory(trainable=trainable, frozen_copy=frozen, backward_layers=len(copied))


# method.rmu_positions: which positions a term averages over -> what the term is a mean over
# (Term.normalizer's unit, renormalised by the step's global count).
RMU_POSITIONS = {"attended": "positions", "labelled": "examples"}


def rmu_control_vector(dim: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """RMU's target c * u: u uniform in [0, 1)^dim, normalised (as in the WMDP code), drawn from its
    own generator so that every rank and every resumed run steers toward the same vector."""
    generator = torch.Generator().manual_seed(int(seed))
    u = torch.rand(dim, generator=generator, dtype=torch.float64)
    return (u / u.norm() * steering_coeff).float()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"method rmu: cannot find the decoder layers of {type(model).__name__} (get_decoder().layers)")
    return layers


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _to_dtype(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_dtype(v, dtype) for v in value)
    return value


def rmu_trainable_pattern(config) -> re.Pattern:
    """The parameter names RMU trains: rmu_params of the decoder layers rmu_update_layers."""
    layers = "|".join(str(i) for i in sorted(config.rmu_update_layers))
    params = "|".join(re.escape(p) for p in config.rmu_params)
    return re.compile(rf"(^|.*\.)layers\.({layers})\.({params})$")


class RMUState:
    """What RMU needs beside the model being trained.

    RMU trains a few weights so that decoder layer L's output moves to c*u on forget data and
    stays at the frozen model's on retain data. No frozen copy of the whole model is kept: the
    layers below the first updated one never change, so the frozen model's layer-L output is the
    frozen copies of layers [first updated .. L] applied to what enters the first updated layer in
    the live forward (captured by a hook). Memory: those (L - first + 1) layers, e.g. 3 of 32.
    """

    def __init__(self, config, model: nn.Module, *, seed: int):
        layers = _decoder_layers(model)
        if config.rmu_layer >= len(layers):
            raise ValueError(f"method.rmu_layer: the model has {len(layers)} decoder layers, got {config.rmu_layer}")
        self.config = config
        self.layer = config.rmu_layer
        self.first = min(config.rmu_update_layers)
        self.frozen = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.first, self.layer + 1))
        self.frozen.eval().requires_grad_(False)
        dim = getattr(getattr(model, "config", None), "hidden_size", None)
        if dim is None:
            raise ValueError(f"method rmu: {type(model).__name__}.config has no hidden_size")
        self.control = rmu_control_vector(dim, config.rmu_steering_coeff, seed)
        self.positions = config.rmu_positions
        self._captured: dict = {}

    def select_trainable(self, model: nn.Module) -> list[str]:
        """Freeze every parameter but rmu_params of rmu_update_layers; returns the trainable names."""
        pattern = rmu_trainable_pattern(self.config)
        names = []
        for name, parameter in model.named_parameters():
            chosen = bool(pattern.match(name))
            parameter.requires_grad_(chosen)
            if chosen:
                names.append(name)
        if not names:
            raise ValueError(
                f"method.rmu_params: no parameter {self.config.rmu_params} in decoder layers "
                f"{self.config.rmu_update_layers} of {type(model).__name__}"
            )
        return names

    @contextmanager
    def capture(self, model: nn.Module):
        """Within the block, a forward of `model` records what enters the first updated layer and
        the output of layer rmu_layer; the layers above get that output detached (their graph is
        never needed)."""
        layers = _decoder_layers(model)
        self._captured = {}

        def before(module, args, kwargs):
            if "input" not in self._captured:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._captured["input"] = hidden.detach()
                self._captured["args"] = args[1:]
                self._captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        def after(module, args, output):
            if "output" not in self._captured:
                self._captured["output"] = _first(output)
            if isinstance(output, (tuple, list)):
                return type(output)([output[0].detach(), *output[1:]])
            return output.detach()

        handles = [
            layers[self.first].register_forward_pre_hook(before, with_kwargs=True),
            layers[self.layer].register_forward_hook(after),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def frozen_output(self) -> torch.Tensor:
        """The frozen model's layer-rmu_layer output for the captured forward."""
        c = self._captured
        dtype = next(self.frozen.parameters()).dtype
        device = c["input"].device
        if next(self.frozen.parameters()).device != device:
            self.frozen.to(device)
        hidden = c["input"].to(dtype)
        args, kwargs = _to_dtype(c["args"], dtype), _to_dtype(c["kwargs"], dtype)
        for layer in self.frozen:
            hidden = _first(layer(hidden, *args, **kwargs))
        return hidden

    def terms(self, forget: torch.Tensor, retain: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """RMU's forget and retain terms (position means) for the captured forward; forget and
        retain are bool [R, L] masks of the attended positions of each set."""
        if "output" not in self._captured:
            raise RuntimeError("RMUState.terms: no forward ran inside RMUState.capture")
        output = self._captured["output"]
        control = self.control.to(output.device)
        terms = {"forget": _masked_term(output, control, forget)}
        if retain is not None:
            terms["retain"] = _masked_term(output, self.frozen_output().to(output.dtype), retain)
        return terms

    def example_terms(
        self, owner: torch.Tensor, rows: dict[str, slice], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """rmu_positions "labelled": each set's mean over its examples of the per-example mean over
        the labelled positions (labels != -100) for the captured forward; owner [R, L] the
        micro-batch example of each attended position (-1 on padding), labels [R, L]."""
        if "output" not in self._captured:
            raise RuntimeError("RMUState.example_terms: no forward ran inside RMUState.capture")
        output = self._captured["output"]
        labelled = (labels.to(owner.device) != IGNORE_INDEX) & (owner >= 0)
        terms = {"forget": rmu_example_loss(output, self.control.to(output.device), owner, labelled, rows["forget"])}
        if rows.get("retain") is not None:
            frozen = self.frozen_output().to(output.dtype)
            terms["retain"] = rmu_example_loss(output, frozen, owner, labelled, rows["retain"])
        return terms


def _masked_term(activations, target, mask) -> torch.Tensor:
    if not bool(mask.any()):  # a stand-in set: a zero that still reaches the graph
        return activations.sum() * 0.0
    return rmu_activation_loss(activations, target, mask)


# ----------------------------------------------------------------------------- the loss


def rmu_activation_loss(activations: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's term (WMDP, Li et al. 2024, arXiv 2403.03218): the mean squared distance between a
    layer's activations [B, T, D] and a target (the steering vector c*u [D], or the frozen model's
    activations [B, T, D]) over the positions in mask [B, T] (attended positions) and the D features."""
    if activations.dim() != 3:
        raise ValueError(f"activations must be [B, T, D], got {tuple(activations.shape)}")
    if mask.shape != activations.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(activations.shape[:2])}, got {tuple(mask.shape)}")
    count = int(mask.sum())
    if count == 0:
        raise ValueError("mask selects no position: the RMU term is undefined")
    diff = (activations.float() - target.float()).pow(2).mean(dim=-1)
    return torch.where(mask.bool(), diff, 0.0).sum() / count


def rmu_example_loss(
    activations: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, labelled: torch.Tensor, examples: slice
) -> torch.Tensor:
    """RMU's term as open-unlearning averages it (`RMU.compute_activation_loss`): for each example
    of `examples` (places in the micro-batch), the mean over its labelled positions of the squared
    distance (mean over the D features) between the activations [R, T, D] and the target (c*u [D],
    or the frozen activations [R, T, D]); then the mean over those examples. owner [R, T]: the
    example of each position (-1 on padding); labelled [R, T] bool. An example with no labelled
    position contributes 0; a set with no example gives a 0 that still reaches the graph.
    Computed in at least float32."""
    if activations.dim() != 3:
        raise ValueError(f"activations must be [R, T, D], got {tuple(activations.shape)}")
    if owner.shape != activations.shape[:2] or labelled.shape != owner.shape:
        shapes = (tuple(owner.shape), tuple(labelled.shape))
        raise ValueError(f"owner and labelled must be [R, T] = {tuple(activations.shape[:2])}, got {shapes}")
    count = examples.stop - examples.start
    if count <= 0:
        return activations.sum() * 0.0
    dtype = torch.promote_types(activations.dtype, torch.float32)
    chosen = labelled & (owner >= examples.start) & (owner < examples.stop)
    diff = (activations.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)[chosen]
    index = owner[chosen] - examples.start
    sums = diff.new_zeros(count).index_add(0, index, diff)
    positions = torch.zeros(count, dtype=dtype, device=diff.device).index_add(0, index, torch.ones_like(diff))
    return (sums / positions.clamp(min=1)).mean()
