"""RMU's two averaging conventions (method.rmu_positions), each against its formula written in
plain PyTorch: "attended" (the default, fastnpo's benchmark convention: a mean over every attended
position pooled over the set) and "labelled" (open-unlearning's `RMU.compute_activation_loss`: per
example, a mean over the labelled positions, then the mean over the examples)."""

import copy
import typing

import pytest
import torch
from helpers import build_tiny_llama

from fastnpo.config import ConfigError
from fastnpo.data import collate
from fastnpo.methods import (
    METHODS,
    MethodConfig,
    PrepareInputs,
    RMUState,
    TermInputs,
    rmu_control_vector,
)
from fastnpo.modeling import SequenceLogprobModel
from fastnpo.ops import example_of_positions

VOCAB, PAD, SEED = 64, 0, 3
# (prompt length, answer length incl. EOS): prompts and answers of different lengths, so the two
# conventions weigh positions differently and the padded batch has padding.
FORGET = [(9, 2), (3, 8), (6, 4)]
RETAIN = [(4, 6), (10, 3), (2, 2)]


def make_items(shapes, generator, first_index=0):
    items = []
    for i, (prompt, answer) in enumerate(shapes):
        ids = torch.randint(1, VOCAB, (prompt + answer,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "index": first_index + i})
    return items


def setup(positions, **extra):
    generator = torch.Generator().manual_seed(11)
    items = {"forget": make_items(FORGET, generator), "retain": make_items(RETAIN, generator)}
    model = build_tiny_llama(VOCAB, seed=5).double()
    values = dict(rmu_layer=1, rmu_update_layers=[0, 1], rmu_steering_coeff=5.0, rmu_alpha=3.0)
    values.update(forget_coeff=1.5, retain_coeff=0.5, **extra)
    config = MethodConfig(name="rmu", rmu_positions=positions, **values)
    return model, config, items


def trained(model):
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def move_away(model):
    """Moves the trained weights away from the frozen copy's, as a few steps would: at the initial
    weights the retain term and its gradient are 0."""
    generator = torch.Generator().manual_seed(7)
    for p in trained(model):
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * p.std())


# ----------------------------------------------------------------------------- the formulas


def layer_output(model, batch, layer):
    seen = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return seen[0][0] if isinstance(seen[0], tuple) else seen[0]


def per_example_labelled_mean(activations, target, labels):
    """open-unlearning's activation loss, from its definition: the squared error [b, s, d] averaged
    over d, summed over the labelled positions (labels != -100) of each example and divided by
    their number, then averaged over the b examples."""
    mask = (labels != -100).to(activations.dtype)
    squared = (activations - target.expand_as(activations)) ** 2
    per_example = (squared.mean(dim=2) * mask).sum(dim=1) / mask.sum(dim=1)
    return per_example.mean()


def pooled_attended_mean(activations, target, attention_mask):
    """fastnpo's benchmark convention: the squared error averaged over d and over every attended
    position of the set, pooled over its examples."""
    mask = attention_mask.to(activations.dtype)
    squared = (activations - target.expand_as(activations)) ** 2
    return (squared.mean(dim=2) * mask).sum() / mask.sum()


def rmu_loss(model, frozen, items, config, seed, average, pad=PAD):
    """RMU as open-unlearning computes it (one forward per set; a live frozen model):
    gamma * forget term + alpha * retain term, each term `average`d."""
    forget, retain = collate(items["forget"], pad), collate(items["retain"], pad)
    key = "labels" if average is per_example_labelled_mean else "attention_mask"
    acts = layer_output(model, forget, config.rmu_layer)
    control = rmu_control_vector(acts.shape[-1], config.rmu_steering_coeff, seed).to(acts.dtype)
    forget_term = average(acts, control, forget[key])
    with torch.no_grad():
        reference = layer_output(frozen, retain, config.rmu_layer)
    retain_term = average(layer_output(model, retain, config.rmu_layer), reference, retain[key])
    return config.forget_coeff * forget_term + config.rmu_alpha * config.retain_coeff * retain_term


def formula_loss_and_grads(positions, average):
    model, config, items = setup(positions)
    frozen = copy.deepcopy(model)
    RMUState(config, model, seed=SEED).select_trainable(model)
    move_away(model)
    loss = rmu_loss(model, frozen, items, config, SEED, average)
    return loss.detach(), torch.autograd.grad(loss, trained(model))


# ----------------------------------------------------------------------------- fastnpo's step


class BatchForward(SequenceLogprobModel):
    """Called as the trainer calls its log-prob wrapper, forward(batch), but stops at the hidden
    states: the fused log-prob op takes no float64, and these tests need none of its output."""

    def forward(self, batch: dict):
        return self.hidden_states(batch)


def fastnpo_loss_and_grads(positions, splits=1, **extra):
    """The method's terms as the trainer's step forms them: each micro-batch one forward of the
    concatenated sets through the log-prob wrapper inside the method's capture, each term
    renormalised by the step's global count of its unit (what train.step does: a term is a local
    mean over `count(unit, items)` of the micro-batch, scaled by its share of the step's count)."""
    model, config, items = setup(positions, **extra)
    method = METHODS["rmu"]
    state = method.prepare(config, PrepareInputs(model=model, seed=SEED))
    move_away(model)
    wrapper = BatchForward(model)

    def count(unit, set_items):
        return {"examples": len(set_items), "positions": sum(len(it["input_ids"]) for it in set_items)}[unit]

    total, units = 0.0, set()
    for part in range(splits):
        parts = {name: set_items[part::splits] for name, set_items in items.items()}
        forget, retain = len(parts["forget"]), len(parts["retain"])
        rows = {"forget": slice(0, forget), "retain": slice(forget, forget + retain)}
        batch = collate(parts["forget"] + parts["retain"], PAD)
        with method.capture(state, model):
            wrapper(batch)
        activations = method.activation_terms(state, example_of_positions(batch), rows, batch["labels"])
        terms = method.terms(config, TermInputs({}, {}, activations=activations))
        for term in terms.values():
            set_name, unit = term.normalizer.split("_")
            share = count(unit, parts[set_name]) / count(unit, items[set_name])
            total = total + term.coeff * term.value * share
            units.add(unit)
    return total.detach(), torch.autograd.grad(total, trained(model)), units


def assert_same(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert len(grads) == len(want_grads) == 2
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def relative(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_labelled_equals_open_unlearnings_formula_in_loss_and_gradient(splits):
    """Split into micro-batches too: the per-example means renormalised by the step's example
    count give the whole batch's mean, as gradient accumulation and data parallelism need."""
    loss, grads, units = fastnpo_loss_and_grads("labelled", splits)
    assert units == {"examples"}
    assert_same((loss, grads), formula_loss_and_grads("labelled", per_example_labelled_mean))


@pytest.mark.parametrize("splits", [1, 2])
def test_default_is_the_pooled_attended_mean_of_before(splits):
    assert MethodConfig(name="rmu").rmu_positions == "attended"
    assert MethodConfig(name="npo").rmu_positions == "attended"  # resolved whichever method runs
    loss, grads, units = fastnpo_loss_and_grads(None, splits)
    assert units == {"positions"}
    want = formula_loss_and_grads(None, pooled_attended_mean)
    # The default path computes in float32 (as before): its float64-model values agree to that.
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, want[1], strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    explicit = fastnpo_loss_and_grads("attended", splits)
    assert torch.equal(explicit[0], loss) and all(torch.equal(a, b) for a, b in zip(explicit[1], grads, strict=True))


def test_the_two_conventions_differ_on_a_padded_batch_with_prompts():
    """On this batch (the forget term dominated by |c*u|^2 / D, the same at every position):
    loss 0.4% apart, gradient 91% (relative L2); far above the 1e-10 the tests above hold."""
    labelled, pooled = fastnpo_loss_and_grads("labelled"), fastnpo_loss_and_grads("attended")
    loss_difference = abs(float(labelled[0] / pooled[0]) - 1)
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (labelled[1], pooled[1])]
    grad_difference = relative(*flat)
    print(f"labelled vs attended: loss {loss_difference:.2%}, gradient {grad_difference:.1%} (relative L2)")
    assert loss_difference > 1e-3 and grad_difference > 0.2


@pytest.mark.parametrize("value", ["answers", "Labelled", "", 1])
def test_a_bad_rmu_positions_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"method\.rmu_positions: must be one of \['attended', 'labelled'\]"):
        MethodConfig(name="rmu", rmu_positions=value)


# ----------------------------------------------------------------------------- end to end


class CaptureGradients(torch.optim.SGD):
    """Stands in for AdamW: records the first step's gradients, then stops the run."""

    captured: typing.ClassVar[list[torch.Tensor]] = []

    def __init__(self, params, lr, betas=None, eps=None, weight_decay=None):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        CaptureGradients.captured = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        raise StopIteration


@pytest.mark.parametrize("packing", [False, True])
def test_train_with_labelled_positions_takes_open_unlearnings_first_step(tiny, tmp_path, monkeypatch, packing):
    """fastnpo.train.train, method.name=rmu, method.rmu_positions=labelled, two micro-batches per
    step (padded or packed): the first step's gradient is open-unlearning's on the step's batch."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.methods import method_for
    from fastnpo.train import train
    from fastnpo.train.config import load_config
    from fastnpo.train.setup import load_data

    values = {
        "model.name_or_path": tiny["base"],
        "data.forget": tiny["data"],
        "data.retain": tiny["data"],
        "data.batch_size": 3,
        "data.retain_batch_size": 3,
        "data.max_length": 64,
        "data.packing": packing,
        "optim.grad_accum": 2,
        "optim.max_grad_norm": 0,
        "run.output_dir": tmp_path / "run",
        "run.progress": False,
        "run.checkpoint_every": 0,
        "method.name": "rmu",
        "method.rmu_positions": "labelled",
        "method.rmu_layer": 1,
        "method.rmu_update_layers": "[0,1]",
        "method.rmu_steering_coeff": 5.0,
        "method.retain_coeff": 0.5,
    }
    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "configs" / "tiny_cpu.yaml", [f"{k}={v}" for k, v in values.items()])
    assert config.method.rmu_positions == "labelled"
    monkeypatch.setattr(torch.optim, "AdamW", CaptureGradients)
    with pytest.raises(StopIteration):
        train(config)

    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    frozen = copy.deepcopy(model).eval()
    _, batches = load_data(config, tokenizer, method_for("rmu"), 2)
    items = batches.next_items()
    RMUState(config.method, model, seed=config.run.seed).select_trainable(model)
    pad = tokenizer.pad_token_id
    loss = rmu_loss(model, frozen, items, config.method, config.run.seed, per_example_labelled_mean, pad)
    loss.backward()
    expected = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(expected) == len(CaptureGradients.captured) == 2
    for got, want in zip(CaptureGradients.captured, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)
