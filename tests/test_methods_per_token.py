"""WGA, SatImp, CE-U and RMU's pieces against their papers' formulas written with full logits in float64."""

import pytest
import torch
import torch.nn.functional as F

from fastnpo.config import ConfigError
from fastnpo.methods import METHODS, MethodConfig, rmu_control_vector, scored_targets, target_ranks
from fastnpo.methods.rmu import rmu_activation_loss
from fastnpo.methods.token_weighted import satimp_token_weights, wga_token_weights
from fastnpo.ops import ce_u_token_losses, soft_target, target_owner, token_logprobs


def naive_ceu(hidden, weight, labels, ignore_index=-100):
    """CE toward softmax(l) with the label's logit at -inf (detached), per row; 0 on ignored rows."""
    logits = hidden @ weight.T
    keep = labels != ignore_index
    rows, y = logits[keep], labels[keep]
    target = rows.detach().clone().scatter(-1, y[:, None], float("-inf")).softmax(-1)
    out = torch.zeros(labels.shape, dtype=logits.dtype)
    out[keep] = -(target * rows.log_softmax(-1)).sum(-1)
    return out


def inputs(n, d, v, scale=1.0, dtype=torch.float64):
    hidden = (torch.randn(n, d, dtype=dtype) * scale).requires_grad_()
    weight = torch.randn(v, d, dtype=dtype).requires_grad_()
    return hidden, weight


@pytest.mark.parametrize(
    "n,d,v,chunk,scale",
    [(1, 3, 2, None, 1.0), (9, 7, 37, 5, 1.0), (13, 5, 31, 1, 2.0), (6, 16, 101, None, 8.0), (5, 4, 29, 29, 30.0)],
)
def test_ceu_op_values_and_gradients_equal_full_logits(n, d, v, chunk, scale):
    hidden, weight = inputs(n, d, v, scale)
    labels = torch.randint(0, v, (n,))
    if n > 2:
        labels[1] = -100
    upstream = torch.rand(n, dtype=torch.float64) + 0.5
    want = naive_ceu(hidden, weight, labels)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    got = ce_u_token_losses(h32, w32, labels, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    got_grads = torch.autograd.grad((got * upstream.float()).sum(), (h32, w32))
    # fp32 against the float64 reference: the tolerance of the same math in torch fp32.
    torch.testing.assert_close(got.double(), want, atol=5e-4 * scale, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, atol=5e-4 * scale, rtol=1e-3)
    assert bool((got[labels == -100] == 0).all())


def test_ceu_op_when_the_label_holds_all_the_mass():
    """p_y ~ 1: the sums without the label are accumulated directly (no 1 - p_y cancellation)."""
    hidden, weight = inputs(4, 6, 11)
    labels = torch.tensor([0, 3, 10, 5])
    with torch.no_grad():
        weight[labels] = hidden * 40.0  # the label's logit dominates
    want = naive_ceu(hidden, weight, labels)
    got = ce_u_token_losses(hidden.detach().float(), weight.detach().float(), labels, chunk_size=3)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-4)


def test_ceu_op_batched_shape_all_ignored_and_bad_input():
    hidden, weight = inputs(6, 5, 13, dtype=torch.float32)
    labels = torch.full((2, 3), -100)
    out = ce_u_token_losses(hidden.view(2, 3, 5), weight, labels)
    assert out.shape == (2, 3) and bool((out == 0).all())
    out.sum().backward()  # no graph through an all-ignored batch is fine
    with pytest.raises(ValueError, match="chunk_size"):
        ce_u_token_losses(hidden, weight, torch.zeros(6, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        ce_u_token_losses(hidden, weight[:1], torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="labels contains 13"):
        ce_u_token_losses(hidden, weight, torch.full((6,), 13))


def tiny_lm(b=3, t=9, d=8, v=41):
    """Hidden states, lm_head and a padded batch as the collator builds it (prompt labels -100,
    the last row's last two positions padding)."""
    hidden, weight = inputs(b * t, d, v, scale=2.0)
    labels = torch.randint(0, v, (b, t))
    labels[:, :3] = -100
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[-1, -2:] = 0
    labels[attention_mask == 0] = -100
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": attention_mask, "labels": labels}
    return hidden, weight, batch


def shifted(hidden, weight, labels):
    b, t = labels.shape
    targets = torch.cat([labels[:, 1:], torch.full((b, 1), -100)], 1)
    return hidden.view(b, t, -1), targets


def fp32(*tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


WEIGHTED = {
    "wga": (MethodConfig(name="wga", wga_beta=0.7), lambda p: p**0.7),
    "satimp": (MethodConfig(name="satimp", satimp_beta1=3.0, satimp_beta2=0.5), lambda p: p**3.0 * (1 - p) ** 0.5),
}


@pytest.mark.parametrize("name", ["wga", "satimp"])
def test_weighted_ga_equals_the_formula_with_stop_gradient_weights(name):
    hidden, weight, batch = tiny_lm()
    h3, targets = shifted(hidden, weight, batch["labels"])
    mask = targets != -100
    # Every other target the model's most likely token: p from about 1/V to near 1, so that both
    # weight factors matter and the term is far above the tolerance (random targets alone give
    # SatImp terms of about 1e-6).
    likely = (h3 @ weight.T).argmax(-1).detach()
    swap = mask & (torch.arange(targets.shape[1]) % 2 == 0)
    targets = torch.where(swap, likely, targets)
    batch["labels"][:, 1:] = targets[:, :-1]
    config, weights_of = WEIGHTED[name]
    # The paper's formula on full logits in float64: -w * NLL, w from p with its gradient stopped.
    logp = (h3 @ weight.T).log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want = (weights_of(logp.detach().exp()) * logp)[mask].mean()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    method, owner, forget_rows = METHODS[name], target_owner(batch), slice(0, 3)
    scored = scored_targets(config, owner, forget_rows)
    assert torch.equal(scored, mask)
    # Both designs' forget terms: the two-call one (forget_term, inside the wrapper's forward) and
    # the one-pass one (token_forget_term, the scored positions and their count found on the host).
    for design in ("two_call", "one_pass"):
        h32, w32 = fp32(hidden, weight)
        tokens = token_logprobs(h32.view(h3.shape), w32, targets, impl="torch")
        if design == "two_call":
            got = method.forget_term(config, None, tokens, h32.view(h3.shape), w32, targets, owner, forget_rows)
        else:
            got = method.token_forget_term(config, tokens, scored, int(scored.sum()))
        got_grads = torch.autograd.grad(got, (h32, w32))
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
        for g, e in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-3)


def test_weighted_ga_refuses_bad_parameters_and_is_zero_without_a_forget_token():
    with pytest.raises(ConfigError, match=r"method\.wga_beta"):
        MethodConfig(name="wga", wga_beta=0.0)
    with pytest.raises(ConfigError, match=r"method\.satimp_beta2"):
        MethodConfig(name="satimp", satimp_beta2=-1.0)
    tokens = torch.full((2, 3), -1.0)
    with pytest.raises(ValueError, match="beta must be"):
        wga_token_weights(tokens, beta=0)
    with pytest.raises(ValueError, match="beta2 must be"):
        satimp_token_weights(tokens, beta2=-1)
    # A micro-batch without forget rows (a stand-in set) scores no token: the term is 0, not NaN.
    hidden, weight, batch = tiny_lm()
    h3, targets = shifted(hidden, weight, batch["labels"])
    h32, w32 = fp32(hidden, weight)
    tokens = token_logprobs(h32.view(h3.shape), w32, targets, impl="torch")
    got = METHODS["wga"].forget_term(
        MethodConfig(name="wga"), None, tokens, h32.view(h3.shape), w32, targets, target_owner(batch), slice(0, 0)
    )
    assert float(got.detach()) == 0.0


@pytest.mark.parametrize("ignore_first", [0, 1, 2])
def test_ceu_term_equals_the_formula_and_skips_the_first_answer_tokens(ignore_first, monkeypatch):
    hidden, weight, batch = tiny_lm()
    h3, targets = shifted(hidden, weight, batch["labels"])
    valid = targets != -100
    scored = valid & (valid.cumsum(-1) > ignore_first)
    want = naive_ceu(h3[scored], weight, targets[scored]).mean()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    # The method picks the op's vocabulary block width itself (one block at this vocabulary):
    # blocks of 7 columns so that the blockwise sums are what is checked.
    widths = []
    monkeypatch.setattr(soft_target, "vocab_chunk", lambda rows, vocab, size: widths.append(vocab) or 7)
    config = MethodConfig(name="ceu", ceu_ignore_first=ignore_first)
    h32, w32 = fp32(hidden, weight)
    tokens = token_logprobs(h32.view(h3.shape), w32, targets, impl="torch")
    owner = target_owner(batch)
    got = METHODS["ceu"].forget_term(config, None, tokens, h32.view(h3.shape), w32, targets, owner, slice(0, 3))
    got_grads = torch.autograd.grad(got, (h32, w32))
    assert widths == [41]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-3)
    with pytest.raises(ConfigError, match=r"method\.ceu_ignore_first"):
        MethodConfig(name="ceu", ceu_ignore_first=-1)


def test_target_ranks_and_scored_targets_in_padded_and_packed_layouts():
    # Row 0 packs examples 0 and 1; row 1 holds example 2; -1: no target.
    owner = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1], [-1, -1, 2, 2, 2, 2, -1, -1]])
    assert target_ranks(owner).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 0, 0]]
    ceu = MethodConfig(name="ceu", ceu_ignore_first=1)
    scored = scored_targets(ceu, owner, slice(1, 3))  # examples 1 and 2 are the forget set
    assert scored.int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]]
    wga = MethodConfig(name="wga")
    assert int(scored_targets(wga, owner, slice(0, 3)).sum()) == 9


def test_rmu_pieces():
    u = rmu_control_vector(64, 6.5, seed=3)
    assert torch.equal(u, rmu_control_vector(64, 6.5, seed=3)) and not torch.equal(u, rmu_control_vector(64, 6.5, 4))
    assert float(u.norm()) == pytest.approx(6.5, rel=1e-6) and bool((u >= 0).all())
    acts = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = rmu_activation_loss(acts, u[:4], mask)
    want = F.mse_loss(acts[mask], u[:4].expand(8, 4))  # mean over positions and features
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="no position"):
        rmu_activation_loss(acts, u[:4], torch.zeros_like(mask))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"wga_beta": 0.0}, "method.wga_beta"),
        ({"satimp_beta1": -1.0}, "method.satimp_beta1"),
        ({"ceu_ignore_first": -2}, "method.ceu_ignore_first"),
        ({"rmu_update_layers": [8]}, "method.rmu_update_layers"),
        ({"rmu_update_layers": [5, 5]}, "method.rmu_update_layers"),
        ({"rmu_alpha": -1.0}, "method.rmu_alpha"),
        ({"rmu_steering_coeff": float("nan")}, "method.rmu_steering_coeff"),
        ({"undial_beta": 0.0}, "method.undial_beta"),
        ({"undial_beta": float("inf")}, "method.undial_beta"),
    ],
)
def test_method_config_names_the_bad_argument(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", "[.]")):
        MethodConfig(name="rmu", **kwargs)
