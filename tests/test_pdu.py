"""PDU (primal-dual unlearning): the forget loss and the dual update against a plain-PyTorch
reimplementation of open-unlearning's PDU (src/trainer/unlearn/pdu.py), resume, bad values."""

import json
from pathlib import Path

import pytest
import torch
from helpers import interrupted_in_step, tiny_config
from safetensors.torch import load_file

from fastnpo.methods import METHODS, MethodConfig
from fastnpo.methods import pdu as pdu_module
from fastnpo.train import train
from fastnpo.train.config import ConfigError

# lambda starts at 2 (retain_coeff), stays for one warm-up step, then moves by 0.5 x (NLL - eps):
# eps sits ~3 above the tiny model's retain NLL, so lambda falls to ~0.5 and then is clipped at 0.
SETTINGS = {
    "method.name": "pdu",
    "method.retain_coeff": 2.0,
    "method.pdu_dual_lr": 0.5,
    "method.pdu_warmup_steps": 1,
    "optim.warmup_epochs": 0,
    "optim.max_grad_norm": 0,
    "optim.max_steps": 3,
}


def epsilon(tiny) -> float:
    """The initial tiny model's retain NLL + 3 (well above it, so the dual variable falls)."""
    return round(tiny_retain_nll(tiny) + 3.0, 3)


_NLL = {}


def tiny_retain_nll(tiny) -> float:
    if "nll" not in _NLL:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny["base"])
        _, batches, pad = first_batches(tiny, 1)
        with torch.no_grad():
            _NLL["nll"] = float(model(**padded(batches[0]["retain"], pad)).loss)
    return _NLL["nll"]


def first_batches(tiny, steps, **overrides):
    from transformers import AutoTokenizer

    from fastnpo.methods import method_for
    from fastnpo.train.setup import load_data

    config = tiny_config(tiny, "unused", **SETTINGS, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    _, batches = load_data(config, tokenizer, method_for("pdu"), 1)
    return config, [batches.next_items() for _ in range(steps)], tokenizer.pad_token_id


def padded(items, pad):
    from fastnpo.data import collate

    batch = collate(items, pad)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


# ----------------------------------------------------------------------------- open-unlearning's PDU


def open_unlearning_pdu(model, batches, pad, *, gamma, alpha, eps, step_size, warmup_steps, optimizer, scheduler):
    """open-unlearning's PDU.compute_loss + final_loss_value over the steps (one process, no
    gradient accumulation, dual_update_upon "step"), written from their definition: full logits,
    (max - mean)^2 at the positions whose label is not -100 (no shift), the retain loss the HF
    token-mean NLL, loss = gamma * forget + lambda * (retain - eps), then (after the warm-up)
    lambda <- max(0, lambda + step_size * (retain - eps)). Returns lambda after each step."""
    preference, duals = alpha, []
    for step, items in enumerate(batches, start=1):
        forget = padded(items["forget"], pad)
        logits = model(**forget).logits
        logits = logits.reshape(-1, logits.size(-1))
        forget_loss = (logits.max(dim=-1)[0] - logits.mean(dim=-1)) ** 2
        mask = (forget["labels"] != -100).reshape(-1)
        forget_loss = (forget_loss * mask).sum() / mask.sum()
        retain_loss = model(**padded(items["retain"], pad)).loss - eps
        loss = (torch.tensor([gamma, preference]) * torch.hstack([forget_loss, retain_loss])).sum()
        if step > warmup_steps:  # can_update: open-unlearning counts epochs, fastnpo steps
            preference = max(0, preference + step_size * retain_loss.item())
        duals.append(preference)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return duals


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The trainer's 3-step PDU run straight, and stopped after its step-2 checkpoint then
    resumed; lambda after each step of each (recorded from after_step)."""
    root = tmp_path_factory.mktemp("pdu")
    eps = epsilon(tiny)
    duals, real = [], pdu_module.PDU.after_step

    def recording(self, config, state, result):
        real(self, config, state, result)
        duals.append(state.dual)

    pdu_module.PDU.after_step = recording
    try:
        common = {**SETTINGS, "method.pdu_epsilon": eps, "run.cache_dir": root / "cache"}
        train(tiny_config(tiny, root / "straight", **common))
        straight = list(duals)
        duals.clear()
        stopped = {**common, "run.checkpoint_every": 2}
        with interrupted_in_step(3), pytest.raises(KeyboardInterrupt):
            train(tiny_config(tiny, root / "stopped", **stopped))
        train(tiny_config(tiny, root / "stopped", **stopped))
        resumed = list(duals)
    finally:
        pdu_module.PDU.after_step = real
    return {"root": root, "eps": eps, "straight": straight, "resumed": resumed}


def test_pdu_matches_open_unlearning_over_three_steps(tiny, runs):
    from transformers import AutoModelForCausalLM

    from fastnpo.train.setup import linear_schedule

    config, batches, pad = first_batches(tiny, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).train()
    o = config.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(3, 0))
    m = config.method
    duals = open_unlearning_pdu(
        model,
        batches,
        pad,
        gamma=m.forget_coeff,
        alpha=m.retain_coeff,
        eps=runs["eps"],
        step_size=m.pdu_dual_lr,
        warmup_steps=m.pdu_warmup_steps,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    assert duals[0] == 2.0 and 0 < duals[1] < 2 and duals[2] == 0, duals  # warm-up, a move, the clip at 0
    assert runs["straight"] == pytest.approx(duals, abs=1e-5), (runs["straight"], duals)
    got = load_file(Path(runs["root"]) / "straight" / "final" / "model.safetensors")
    worst = 0.0
    for name, want in model.state_dict().items():
        if name in got:
            worst = max(worst, (got[name] - want).abs().max().item())
    dual_error = max(abs(a - b) for a, b in zip(runs["straight"], duals, strict=True))
    print(f"PDU vs open-unlearning: max |lambda diff| {dual_error:.3e}, max |param diff| {worst:.3e}")
    assert worst < 2e-5


def test_pdu_resumes_to_the_uninterrupted_run(runs):
    root = Path(runs["root"])
    assert len(runs["straight"]) == 3 and len(runs["resumed"]) == 3  # steps 1-2, then step 3 after the resume
    assert runs["resumed"] == runs["straight"]
    saved = json.loads((root / "stopped" / "checkpoints" / "step_2" / "trainer.json").read_text())
    assert saved["method"] == {"dual": runs["straight"][1], "steps": 2}
    a, b = (load_file(root / name / "final" / "model.safetensors") for name in ("straight", "stopped"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_logit_margins_equal_full_logits_across_vocabulary_blocks(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(601, 12, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(pdu_module, "BLOCK_ELEMENTS", 7 * 100)  # 256-wide vocabulary blocks: 3 of them
    got = pdu_module.logit_margins(hidden.float(), weight.float())
    (got * torch.arange(1.0, 8.0)).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    want = (logits.max(dim=-1)[0] - logits.mean(dim=-1)) ** 2
    (want * torch.arange(1.0, 8.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0].double(), hidden.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[1].double(), weight.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "key,value",
    [("pdu_epsilon", -0.1), ("pdu_dual_lr", -1.0), ("pdu_warmup_steps", -1), ("pdu_warmup_steps", 1.5)],
)
def test_bad_pdu_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}"):
        MethodConfig(name="pdu", **{key: value})
    with pytest.raises(ConfigError, match=rf"method\.{key}"):  # checked whichever method runs
        MethodConfig(name="npo", **{key: value})


def test_pdu_defaults_and_registry():
    config = MethodConfig(name="pdu")
    assert (config.pdu_epsilon, config.pdu_dual_lr, config.pdu_warmup_steps) == (0.3, 1.0, 0)
    method = METHODS["pdu"]
    assert method.sets == ("forget", "retain") and method.ref_sets == () and not method.separable
    state = method.prepare(MethodConfig(name="pdu", retain_coeff=5.0), None)
    assert state.dual == 5.0 and method.state_dict(state) == {"dual": 5.0, "steps": 0}
