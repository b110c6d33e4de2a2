"""WGA, SatImp, CE-U and RMU's pieces against their papers' formulas written with full logits in float64."""

import pytest
import torch
import torch.nn.functional as F

from fastnpo.config import ConfigError
from fastnpo.methods import MethodConfig, rmu_control_vector, scored_targets, target_ranks
from fastnpo.methods.ceu import ceu_loss
from fastnpo.methods.rmu import rmu_activation_loss
from fastnpo.methods.token_weighted import satimp_from_token_logprobs, wga_from_token_logprobs
from fastnpo.ops import ce_u_token_losses, token_logprobs


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
    """Hidden states, lm_head and Hugging Face labels (prompt -100, one padded row)."""
    hidden, weight = inputs(b * t, d, v, scale=2.0)
    labels = torch.randint(0, v, (b, t))
    labels[:, :3] = -100
    labels[-1, -2:] = -100
    return hidden, weight, labels


def shifted(hidden, weight, labels):
    b, t = labels.shape
    targets = torch.cat([labels[:, 1:], torch.full((b, 1), -100)], 1)
    return hidden.view(b, t, -1), targets


@pytest.mark.parametrize("name", ["wga", "satimp"])
def test_weighted_ga_equals_the_formula_with_stop_gradient_weights(name):
    hidden, weight, labels = tiny_lm()
    h3, targets = shifted(hidden, weight, labels)
    mask = targets != -100
    # The paper's formula on full logits in float64: -w * NLL, w from p with its gradient stopped.
    logp = (h3 @ weight.T).log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    p = logp.detach().exp()
    w = p**0.7 if name == "wga" else p**3.0 * (1 - p) ** 0.5
    want = (w * logp)[mask].mean()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    tokens = token_logprobs(h32.view(h3.shape), w32, targets, impl="torch")
    if name == "wga":
        got = wga_from_token_logprobs(tokens, mask, beta=0.7)
    else:
        got = satimp_from_token_logprobs(tokens, mask, beta1=3.0, beta2=0.5)
    got_grads = torch.autograd.grad(got, (h32, w32))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-3)


def test_weighted_ga_refuses_bad_parameters():
    tokens = torch.full((2, 3), -1.0)
    with pytest.raises(ValueError, match="beta must be"):
        wga_from_token_logprobs(tokens, beta=0)
    with pytest.raises(ValueError, match="beta2 must be"):
        satimp_from_token_logprobs(tokens, beta2=-1)
    with pytest.raises(ValueError, match="selects no token"):
        wga_from_token_logprobs(tokens, torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("ignore_first", [0, 1, 2])
def test_ceu_loss_equals_the_formula_and_skips_the_first_answer_tokens(ignore_first):
    hidden, weight, labels = tiny_lm()
    h3, targets = shifted(hidden, weight, labels)
    valid = targets != -100
    scored = valid & (valid.cumsum(-1) > ignore_first)
    want = naive_ceu(h3[scored], weight, targets[scored]).mean()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    got = ceu_loss(h32.view(h3.shape), w32, labels, ignore_first=ignore_first, chunk_size=7)
    got_grads = torch.autograd.grad(got, (h32, w32))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="ignore_first"):
        ceu_loss(h32.view(h3.shape), w32, labels, ignore_first=-1)


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
