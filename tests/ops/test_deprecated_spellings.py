"""The spellings kept for one release (issue 25 item 5): `fused=` (now `design=`) on npo_loss, ga_loss,
fused_sequence_loss and example_loss, and impl="cublas" (now "split"). Each still works, gives what
the new spelling gives, and warns naming the new spelling; the old and the new together are refused.
Every other test uses the new spellings."""

import warnings

import pytest
import torch

import fastnpo
from fastnpo.ops import example_loss, fused_sequence_loss

IGNORE = -100
B, T, D, V = 3, 6, 16, 37


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) / D**0.5
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[:, :2] = IGNORE  # a prompt
    return hidden, weight, labels


def value_and_grads(call, hidden, weight):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = call(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_same(got, want):
    for a, b, name in zip(got, want, ("loss", "dH", "dW"), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


# fused value -> the design it spelled
OLD_TO_NEW = [(False, "two_call"), (True, "two_sweep"), ("one_pass", "one_pass")]


def deprecated(call, old, new):
    """call(), which must warn once that fused=old is deprecated and name design=new."""
    with pytest.warns(DeprecationWarning, match=rf"fused={old!r} is deprecated.*use design={new!r}"):
        return call()


@pytest.mark.parametrize("old,new", OLD_TO_NEW)
def test_npo_loss_fused_still_works_and_warns(old, new):
    hidden, weight, labels = batch()
    ref = torch.randn(B) - 20
    call = lambda **kw: lambda h, w: fastnpo.npo_loss(h, w, labels, ref, beta=0.3, impl="torch", **kw)
    got = deprecated(lambda: value_and_grads(call(fused=old), hidden, weight), old, new)
    assert_same(got, value_and_grads(call(design=new), hidden, weight))


@pytest.mark.parametrize("old,new", OLD_TO_NEW)
def test_ga_loss_fused_still_works_and_warns(old, new):
    hidden, weight, labels = batch(1)
    call = lambda **kw: lambda h, w: fastnpo.ga_loss(h, w, labels, impl="torch", **kw)
    got = deprecated(lambda: value_and_grads(call(fused=old), hidden, weight), old, new)
    assert_same(got, value_and_grads(call(design=new), hidden, weight))


@pytest.mark.parametrize("old,new", OLD_TO_NEW)
def test_fused_sequence_loss_fused_still_works_and_warns(old, new):
    hidden, weight, labels = batch(2)
    targets = fastnpo.ops.aligned_labels(labels, True, IGNORE).reshape(-1)
    call = lambda **kw: (
        lambda h, w: fused_sequence_loss(
            h.reshape(B * T, D),
            w,
            targets,
            T,
            lambda lp: lp.sum() / 7,
            ignore_index=IGNORE,
            impl="torch",
            filter_eps=None,
            **kw,
        )
    )
    got = deprecated(lambda: value_and_grads(call(fused=old), hidden, weight), old, new)
    assert_same(got, value_and_grads(call(design=new), hidden, weight))


@pytest.mark.parametrize("old,new", OLD_TO_NEW)
def test_example_loss_fused_still_works_and_warns(old, new):
    hidden, weight, labels = batch(3)
    targets = fastnpo.ops.aligned_labels(labels, True, IGNORE).reshape(-1)
    owner = torch.arange(B).repeat_interleave(T)
    owner = torch.where(targets != IGNORE, owner, -1)
    call = lambda **kw: (
        lambda h, w: example_loss(
            h.reshape(B * T, D), w, targets, owner, B, lambda lp: lp.sum() / 7, impl="torch", **kw
        )
    )
    got = deprecated(lambda: value_and_grads(call(fused=old), hidden, weight), old, new)
    assert_same(got, value_and_grads(call(design=new), hidden, weight))


def test_the_defaults_are_what_they_were():
    # npo_loss / ga_loss: fused=False ("two_call"); fused_sequence_loss: True ("two_sweep");
    # example_loss: "one_pass". A two-call loss can be back-propagated twice, the others once.
    hidden, weight, labels = batch(4)
    targets = fastnpo.ops.aligned_labels(labels, True, IGNORE).reshape(-1)
    owner = torch.where(targets != IGNORE, torch.arange(B).repeat_interleave(T), -1)
    h = hidden.clone().requires_grad_()
    calls = {
        "npo_loss": (lambda: fastnpo.npo_loss(h, weight, labels, torch.zeros(B), impl="torch"), True),
        "ga_loss": (lambda: fastnpo.ga_loss(h, weight, labels, impl="torch"), True),
        "fused_sequence_loss": (
            lambda: fused_sequence_loss(
                h.reshape(B * T, D), weight, targets, T, torch.sum, ignore_index=IGNORE, impl="torch", filter_eps=None
            ),
            False,
        ),
        "example_loss": (lambda: example_loss(h.reshape(B * T, D), weight, targets, owner, B, torch.sum), False),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the defaults warn about nothing
        for call, twice in calls.values():
            loss = call()
            loss.backward(retain_graph=True)
            if twice:
                loss.backward()
            else:
                with pytest.raises(RuntimeError, match="back-propagated once"):
                    loss.backward()
            h.grad = None


def test_design_and_fused_together_are_refused_naming_both():
    hidden, weight, labels = batch(5)
    with pytest.raises(ValueError, match=r"not both \(got design='one_pass', fused=False\)"):
        fastnpo.npo_loss(hidden, weight, labels, torch.zeros(B), design="one_pass", fused=False)
    with pytest.raises(ValueError, match="not both"):
        fastnpo.ga_loss(hidden, weight, labels, design="two_call", fused=True)
    targets = labels.reshape(-1)
    with pytest.raises(ValueError, match="not both"):
        fused_sequence_loss(
            hidden.reshape(B * T, D),
            weight,
            targets,
            T,
            torch.sum,
            ignore_index=IGNORE,
            impl="torch",
            filter_eps=None,
            design="two_sweep",
            fused=True,
        )
    with pytest.raises(ValueError, match="not both"):
        example_loss(
            hidden.reshape(B * T, D),
            weight,
            targets,
            torch.zeros(B * T, dtype=torch.long),
            1,
            torch.sum,
            design="one_pass",
            fused="one_pass",
        )


def test_bad_fused_values_are_still_refused_naming_the_argument():
    # What test_bad_fused_value_names_the_argument checked before design= existed.
    hidden, weight, labels = batch(6)
    for bad in ("one-pass", "True", 1):
        with pytest.raises(ValueError, match=r"fused .*must be"):
            fastnpo.npo_loss(hidden, weight, labels, torch.zeros(B), fused=bad)
        with pytest.raises(ValueError, match=r"fused .*must be"):
            fastnpo.ga_loss(hidden, weight, labels, fused=bad)
        with pytest.raises(ValueError, match=r"fused .*must be"):
            fused_sequence_loss(
                hidden.reshape(B * T, D),
                weight,
                labels.reshape(-1),
                T,
                torch.sum,
                ignore_index=IGNORE,
                impl="torch",
                filter_eps=None,
                fused=bad,
            )


def test_impl_cublas_is_split_and_warns():
    hidden, weight, labels = batch(7)
    y = labels.reshape(-1)
    call = lambda impl: lambda h, w: fastnpo.token_logprobs(h.reshape(B * T, D), w, y, impl=impl).sum()
    with pytest.warns(DeprecationWarning, match=r"impl='cublas' is deprecated.*use impl='split'"):
        got = value_and_grads(call("cublas"), hidden, weight)
    assert_same(got, value_and_grads(call("split"), hidden, weight))
    assert "cublas" in fastnpo.ops.IMPLS and "split" in fastnpo.ops.IMPLS  # configs that name it still load
