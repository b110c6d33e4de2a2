"""Every bad input of the public API raises a clear exception naming the argument."""

import pytest
import torch

import fastnpo
from fastnpo import losses

H = torch.randn(2, 5, 8)
W = torch.randn(11, 8)
Y = torch.randint(0, 11, (2, 5))
REF = torch.zeros(2)


def labels_with(value):
    labels = Y.clone()
    labels[1, 3] = value
    return labels


def call(fn, **override):
    kwargs = dict(hidden=H, weight=W, labels=Y)
    kwargs.update(override)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("hidden", "weight", "labels")}
    if fn is fastnpo.npo_loss:
        extra.setdefault("ref_logps", REF)
    return fn(kwargs["hidden"], kwargs["weight"], kwargs["labels"], **extra)


ALL = [fastnpo.token_logprobs, fastnpo.sequence_logprobs, fastnpo.npo_loss, fastnpo.ga_loss]


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize(
    "override,error,match",
    [
        (dict(hidden=H.double()), TypeError, "hidden must be float32"),
        (dict(hidden=H.tolist()), TypeError, "hidden must be a torch.Tensor"),
        (dict(weight=W[:, :7]), ValueError, "weight has hidden_dim 7"),
        (dict(weight=W[0]), ValueError, "weight must be 2-D"),
        (dict(weight=W.half()), TypeError, "weight dtype"),
        (dict(weight=W.to("meta")), ValueError, "weight is on meta"),
        (dict(labels=Y.float()), TypeError, "labels must be an integer"),
        (dict(labels=Y[:, :4]), ValueError, "labels shape"),
        (dict(labels=labels_with(11)), ValueError, "labels contains 11"),
        (dict(labels=labels_with(-3)), ValueError, "labels contains -3"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(filter_eps=-1.0), ValueError, "filter_eps"),
    ],
)
def test_bad_inputs(fn, override, error, match):
    with pytest.raises(error, match=match):
        call(fn, **override)


@pytest.mark.parametrize("fn", [fastnpo.sequence_logprobs, fastnpo.npo_loss])
def test_sequence_functions_need_three_dims(fn):
    with pytest.raises(ValueError, match="hidden must have 3 dimensions"):
        call(fn, hidden=H[0], labels=Y[0])


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_npo_beta(beta):
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fastnpo.npo_loss(H, W, Y, REF, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        losses.npo_from_logprobs(REF, REF, beta=beta)


@pytest.mark.parametrize(
    "ref,match",
    [
        (torch.zeros(3), r"ref_logps must have shape \[2\]"),
        (torch.zeros(2, 1), r"ref_logps must have shape"),
        (torch.tensor([0.0, float("nan")]), "ref_logps contains NaN"),
        (torch.zeros(2, dtype=torch.long), "ref_logps must be a float"),
        ([0.0, 0.0], "ref_logps must be a torch.Tensor"),
    ],
)
def test_npo_ref_logps(ref, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastnpo.npo_loss(H, W, Y, ref)


def test_npo_weights():
    with pytest.raises(ValueError, match="weights must have shape"):
        fastnpo.npo_loss(H, W, Y, REF, weights=torch.ones(3))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        fastnpo.npo_loss(H, W, Y, REF, weights=torch.tensor([1.0, -1.0]))


def test_ga_loss_with_no_target():
    with pytest.raises(ValueError, match="labels has no target"):
        fastnpo.ga_loss(H, W, torch.full_like(Y, -100))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fastnpo.token_logprobs(H, W, Y, impl="triton")


def test_losses_of_logprobs_check_their_inputs():
    lp = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="token_counts must be > 0"):
        losses.simnpo_from_logprobs(lp, torch.tensor([3.0, 0.0]))
    with pytest.raises(ValueError, match="token_counts sums to 0"):
        losses.nll_from_logprobs(lp, torch.zeros(2))
    with pytest.raises(ValueError, match=r"rejected_logps must have shape \[2\]"):
        losses.dpo_from_logprobs(lp, lp[:1], lp, lp)
    with pytest.raises(ValueError, match="logps must be a 1-D tensor"):
        losses.npo_from_logprobs(lp[None], lp)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        losses.simnpo_from_logprobs(lp, torch.ones(2), gamma=float("nan"))


def test_inputs_are_not_modified():
    hidden, weight, labels = H.clone(), W.clone(), Y.clone()
    labels[0, 0] = -100
    before = labels.clone()
    fastnpo.npo_loss(hidden, weight, labels, REF, impl="torch")
    fastnpo.sequence_logprobs(hidden, weight, labels, impl="torch")
    assert torch.equal(labels, before) and torch.equal(hidden, H) and torch.equal(weight, W)
