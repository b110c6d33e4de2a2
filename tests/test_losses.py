"""NPO / GA from hidden states, and the losses of per-sequence log-probs, against naive formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TRITON_DEVICE

import fastnpo
from fastnpo import losses

IGNORE = -100


def device_for(impl):
    return TRITON_DEVICE if impl == "triton" else "cpu"


def batch(b=4, t=9, d=24, v=61, device="cpu", dtype=torch.float32):
    hidden = (torch.randn(b, t, d, dtype=torch.float64) * 2).to(dtype).to(device)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (b, t), device=device)
    prompt = torch.randint(1, t - 2, (b,))
    for row in range(b):
        labels[row, : prompt[row]] = IGNORE  # prompt positions
    labels[0, -2:] = IGNORE  # right padding
    return hidden, weight, labels


def reference_sequence_logprobs(hidden, weight, labels, shift=True):
    """float64, through full logits and F.cross_entropy (the Hugging Face way)."""
    logits = hidden.double() @ weight.double().T
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return -nll.sum(1), (labels != IGNORE).sum(1)


def reference_npo(hidden, weight, labels, ref_logps, beta, weights):
    logps, _ = reference_sequence_logprobs(hidden, weight, labels)
    per_example = (2 / beta) * F.softplus(beta * (logps - ref_logps.double()))
    return (per_example * (1 if weights is None else weights.double())).mean()


def value_and_grads(fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
@pytest.mark.parametrize("design", ["two_sweep", "two_call"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_npo_loss_matches_formula(impl, design, with_weights):
    device = device_for(impl)
    hidden, weight, labels = batch(device=device)
    true_logps, _ = reference_sequence_logprobs(hidden, weight, labels)
    ref_logps = (true_logps + torch.randn(4, dtype=torch.float64, device=device) * 3).float()
    weights = torch.rand(4, device=device) * 2 if with_weights else None
    beta = 0.37

    ours = value_and_grads(
        lambda h, w: fastnpo.npo_loss(
            h, w, labels, ref_logps, beta=beta, weights=weights, impl=impl, design=design, filter_eps=None
        ),
        hidden,
        weight,
    )
    ref = value_and_grads(
        lambda h, w: reference_npo(h, w, labels, ref_logps, beta, weights), hidden.double(), weight.double()
    )
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    for got, want, name in zip(ours, ref, ["loss", "d hidden", "d weight"], strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=1e-4, msg=name)


def test_npo_gradient_weight_starts_at_one():
    # At logp == ref the per-example NPO gradient dL/dlogp is (2/beta) * beta * sigmoid(0) = 1:
    # NPO starts out exactly as gradient ascent on the summed log-prob.
    logps = torch.tensor([-12.0, -3.5], requires_grad=True)
    loss = losses.npo_from_logprobs(logps, logps.detach(), beta=0.1)
    assert loss.item() == pytest.approx(20 * math.log(2), rel=1e-6)
    (loss * 2).backward()  # mean over 2 examples
    torch.testing.assert_close(logps.grad, torch.ones(2))


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
@pytest.mark.parametrize("design", ["two_sweep", "two_call"])
def test_ga_loss_is_minus_huggingface_loss(impl, design):
    transformers = pytest.importorskip("transformers")
    device = device_for(impl)
    config = transformers.LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    input_ids = torch.randint(0, 67, (3, 11), device=device)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE
    labels[2, 8:] = IGNORE
    stock = model(input_ids=input_ids, labels=labels)
    stock.loss.backward()
    stock_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    hidden = model.model(input_ids=input_ids).last_hidden_state
    ours = fastnpo.ga_loss(hidden, model.lm_head.weight, labels, impl=impl, design=design, filter_eps=None)
    torch.testing.assert_close(ours, -stock.loss, atol=1e-5, rtol=1e-5)
    ours.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, -stock_grad, atol=1e-5, rtol=1e-4)


def test_ga_loss_without_shift_takes_any_leading_shape():
    hidden, weight = torch.randn(2, 3, 5, 16), torch.randn(29, 16)
    labels = torch.randint(0, 29, (2, 3, 5))
    labels[0, 0] = IGNORE
    logits = (hidden.double() @ weight.double().T).reshape(-1, 29)
    want = -F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE)
    got = fastnpo.ga_loss(hidden, weight, labels, shift=False, impl="torch")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_fused_loss_scales_with_upstream_and_skips_work_without_grad():
    hidden, weight, labels = batch()
    ref_logps = torch.zeros(4)
    h = hidden.clone().requires_grad_()
    (3.0 * fastnpo.npo_loss(h, weight, labels, ref_logps, design="two_sweep", impl="torch")).backward()
    h2 = hidden.clone().requires_grad_()
    (3.0 * fastnpo.npo_loss(h2, weight, labels, ref_logps, design="two_call", impl="torch")).backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        value = fastnpo.npo_loss(hidden.requires_grad_(), weight, labels, ref_logps, design="two_sweep", impl="torch")
    assert not value.requires_grad


def test_weights_that_require_grad_still_get_gradients():
    # U2A differentiates the loss with respect to the example weights: the fused path would
    # drop that gradient, so npo_loss must take the two-pass path here.
    hidden, weight, labels = batch()
    weights = torch.rand(4, requires_grad=True)
    loss = fastnpo.npo_loss(hidden, weight, labels, torch.zeros(4), weights=weights, impl="torch")
    loss.backward()
    logps, _ = reference_sequence_logprobs(hidden, weight, labels)
    want = (2 / 0.1) * F.softplus(0.1 * logps) / 4
    torch.testing.assert_close(weights.grad.double(), want, atol=1e-4, rtol=1e-4)


def test_simnpo_dpo_nll_ga_from_logprobs():
    logps = torch.tensor([-10.0, -4.0, -30.0], dtype=torch.float64)
    counts = torch.tensor([5.0, 2.0, 10.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    beta, gamma = 2.5, 0.3

    simnpo = losses.simnpo_from_logprobs(logps, counts, beta=beta, gamma=gamma, weights=w)
    by_hand = (
        sum(
            wi * -(2 / beta) * math.log(1 / (1 + math.exp(-(-(beta / n) * lp - gamma))))
            for lp, n, wi in zip([-10.0, -4.0, -30.0], [5, 2, 10], [1.0, 0.5, 2.0], strict=True)
        )
        / 3
    )
    assert simnpo.item() == pytest.approx(by_hand, rel=1e-6)

    nll = losses.nll_from_logprobs(logps, counts)
    assert nll.item() == pytest.approx(44.0 / 17.0, rel=1e-9)
    assert losses.ga_from_logprobs(logps, counts, weights=w).item() == pytest.approx(
        (-10 - 2 - 60) / 17, rel=1e-9
    )

    chosen, rejected = torch.tensor([-5.0]), torch.tensor([-7.0])
    ref_c, ref_r = torch.tensor([-6.0]), torch.tensor([-6.5])
    margin = 0.1 * ((-5 + 6) - (-7 + 6.5))  # 0.15
    expected = -(2 / 0.1) * math.log(1 / (1 + math.exp(-margin)))
    assert losses.dpo_from_logprobs(chosen, rejected, ref_c, ref_r, beta=0.1).item() == pytest.approx(
        expected, rel=1e-6
    )
    plain = losses.dpo_from_logprobs(chosen, rejected, ref_c, ref_r, beta=0.1, scale=1.0)
    assert plain.item() == pytest.approx(expected * 0.1 / 2, rel=1e-6)


def test_npo_to_ga_as_beta_vanishes():
    logps = torch.tensor([-3.0, -8.0], requires_grad=True)
    losses.npo_from_logprobs(logps, torch.tensor([-2.0, -9.0]), beta=1e-6).backward()
    torch.testing.assert_close(logps.grad, torch.full((2,), 0.5), atol=1e-5, rtol=0)


def test_fused_loss_refuses_a_second_backward():
    hidden, weight, labels = batch()
    hidden.requires_grad_()
    loss = fastnpo.npo_loss(hidden, weight, labels, torch.zeros(4), design="two_sweep", impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        loss.backward()


@pytest.mark.parametrize("design", ["two_call", "two_sweep"])
def test_npo_loss_refuses_rows_without_target_tokens(design):
    # Issue 14: a row whose labels are all ignored gave logp 0 and a silent loss of ~78.
    hidden, weight, labels = batch()
    labels[1] = IGNORE
    labels[3, 0] = 5
    labels[3, 1:] = IGNORE  # only position 0 is labelled, and nothing predicts it after the shift
    with pytest.raises(ValueError, match=r"rows \[1, 3\] have no target token"):
        fastnpo.npo_loss(hidden, weight, labels, torch.zeros(4), impl="torch", design=design)
    labels[:] = IGNORE
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3\]"):
        fastnpo.npo_loss(hidden, weight, labels, torch.zeros(4), impl="torch", design=design)


def test_kl_is_reference_to_policy_averaged_over_attended_positions():
    # NPO+KL's retain term as open-unlearning / TOFU compute it: KL(pi_ref || pi_theta) per position.
    logits = (3 * torch.randn(2, 5, 11, dtype=torch.float64)).requires_grad_()
    ref_logits = 3 * torch.randn(2, 5, 11, dtype=torch.float64)
    attended = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    log_p, log_ref = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    per_position = (log_ref.exp() * (log_ref - log_p)).sum(-1)
    expected = per_position[attended].mean()
    got = losses.kl_from_logits(logits, ref_logits, attended)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    reverse = (log_p.exp() * (log_p - log_ref)).sum(-1)[attended].mean()
    assert abs(float(reverse - expected)) > 1e-3  # the direction matters on these inputs
    (grad,) = torch.autograd.grad(got, logits)
    assert float(grad[0, 3:].abs().max()) == 0.0  # padding takes no part
    with pytest.raises(ValueError, match="attended"):
        losses.kl_from_logits(logits, ref_logits, torch.zeros(2, 5, dtype=torch.bool))
