"""UNDIAL (arXiv 2402.10052): the vocabulary-chunked op, the method's forget term and the cached
reference against the formula written with full logits in float64."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastnpo.config import ConfigError
from fastnpo.methods import METHODS, MethodConfig, UndialReference, forget_token_term, loss_terms, method_for
from fastnpo.methods.undial import undial_token_values
from fastnpo.modeling import decoder
from fastnpo.ops import soft_target, target_owner, token_logprobs, undial_token_losses
from fastnpo.train.setup import prepare_method


def naive_undial(hidden, weight, ref_hidden, ref_weight, labels, beta, ignore_index=-100):
    """CE toward softmax(ref_logits - beta * onehot(label)) (detached), per row; 0 on ignored rows."""
    logits = hidden @ weight.T
    keep = labels != ignore_index
    rows, y = logits[keep], labels[keep]
    ref = (ref_hidden @ ref_weight.T)[keep].detach()
    target = (ref - beta * F.one_hot(y, weight.shape[0]).to(ref.dtype)).softmax(-1)
    out = torch.zeros(labels.shape, dtype=logits.dtype)
    out[keep] = -(target * rows.log_softmax(-1)).sum(-1)
    return out


def inputs(n, d, v, scale=1.0, dtype=torch.float64):
    hidden = (torch.randn(n, d, dtype=dtype) * scale).requires_grad_()
    weight = torch.randn(v, d, dtype=dtype).requires_grad_()
    # The reference: near the current model (as at the start of unlearning), not equal to it.
    ref_hidden = hidden.detach() + 0.3 * torch.randn(n, d, dtype=dtype)
    ref_weight = weight.detach() + 0.3 * torch.randn(v, d, dtype=dtype)
    return hidden, weight, ref_hidden, ref_weight


def fp32(*tensors):
    return [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize(
    "n,d,v,chunk,scale,beta",
    [
        (1, 3, 2, None, 1.0, 10.0),
        (9, 7, 37, 5, 1.0, 10.0),
        (13, 5, 31, 1, 2.0, 3.0),
        (6, 16, 101, None, 8.0, 10.0),
        (5, 4, 29, 29, 30.0, 0.5),
        (11, 9, 53, 8, 1.0, 100.0),
    ],
)
def test_op_values_and_gradients_equal_full_logits(n, d, v, chunk, scale, beta):
    hidden, weight, ref_hidden, ref_weight = inputs(n, d, v, scale)
    labels = torch.randint(0, v, (n,))
    if n > 2:
        labels[1] = -100
        labels[-1] = -100
    upstream = torch.rand(n, dtype=torch.float64) + 0.5
    want = naive_undial(hidden, weight, ref_hidden, ref_weight, labels, beta)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    h32, w32, rh32, rw32 = fp32(hidden, weight, ref_hidden, ref_weight)
    got = undial_token_losses(h32, w32, rh32, rw32, labels, beta=beta, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    got_grads = torch.autograd.grad((got * upstream.float()).sum(), (h32, w32))
    torch.testing.assert_close(got.double(), want, atol=5e-4 * scale, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, atol=5e-4 * scale, rtol=1e-3)
    assert bool((got[labels == -100] == 0).all())


def test_op_gradient_is_p_minus_q_and_nothing_reaches_the_reference():
    hidden, weight, ref_hidden, ref_weight = inputs(7, 6, 19, dtype=torch.float32)
    ref_hidden.requires_grad_()
    ref_weight.requires_grad_()
    labels = torch.randint(0, 19, (7,))
    logits = (hidden @ weight.T).detach().requires_grad_()
    # d loss / d logits = p - q, through the op's chain rule on hidden: dh = (p - q) @ W.
    p = logits.softmax(-1)
    q = ((ref_hidden @ ref_weight.T).detach() - 4.0 * F.one_hot(labels, 19)).softmax(-1)
    got = undial_token_losses(hidden, weight, ref_hidden, ref_weight, labels, beta=4.0, chunk_size=4)
    dh, rh, rw = torch.autograd.grad(got.sum(), (hidden, ref_hidden, ref_weight), allow_unused=True)
    torch.testing.assert_close(dh, (p - q) @ weight.detach(), atol=1e-5, rtol=1e-4)
    assert rh is None and rw is None


def test_op_bf16_is_as_close_to_float64_as_torch_bf16():
    hidden, weight, ref_hidden, ref_weight = inputs(12, 24, 97, scale=2.0)
    labels = torch.randint(0, 97, (12,))
    bf = [t.detach().bfloat16() for t in (hidden, weight, ref_hidden, ref_weight)]
    want = naive_undial(*(t.double() for t in bf), labels, 10.0)
    got = undial_token_losses(*bf, labels, beta=10.0, chunk_size=10)
    torch_bf16 = naive_undial(*bf, labels, 10.0).detach()
    assert bool(((got.double() - want).abs() <= (torch_bf16.double() - want).abs() + 1e-2).all())


def test_op_batched_shape_all_ignored_and_bad_input():
    hidden, weight, ref_hidden, ref_weight = inputs(6, 5, 13, dtype=torch.float32)
    labels = torch.full((2, 3), -100)
    out = undial_token_losses(hidden.view(2, 3, 5), weight, ref_hidden.view(2, 3, 5), ref_weight, labels)
    assert out.shape == (2, 3) and bool((out == 0).all())
    out.sum().backward()  # no graph through an all-ignored batch is fine
    ok = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="ref_hidden must have hidden's shape"):
        undial_token_losses(hidden, weight, ref_hidden[:5], ref_weight, ok)
    with pytest.raises(ValueError, match="ref_weight must have weight's shape"):
        undial_token_losses(hidden, weight, ref_hidden, ref_weight[:12], ok)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        undial_token_losses(hidden, weight, ref_hidden, ref_weight, ok, beta=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        undial_token_losses(hidden, weight, ref_hidden, ref_weight, ok, chunk_size=0)
    with pytest.raises(ValueError, match="labels contains 13"):
        undial_token_losses(hidden, weight, ref_hidden, ref_weight, torch.full((6,), 13))


def tiny_lm(b=3, t=9, d=8, v=41):
    """Current and reference hidden states, lm_heads and Hugging Face labels (prompt -100, one padded row)."""
    hidden, weight, ref_hidden, ref_weight = inputs(b * t, d, v, scale=2.0)
    labels = torch.randint(0, v, (b, t))
    labels[:, :3] = -100
    labels[-1, -2:] = -100
    targets = torch.cat([labels[:, 1:], torch.full((b, 1), -100)], 1)
    return hidden, weight, ref_hidden, ref_weight, labels, targets


def test_method_forget_term_is_the_token_mean_of_the_formula(monkeypatch):
    """Method.forget_term as the trainer calls it: the owner of each target from the padded batch,
    the reference rows looked up by each row's example index in a cache built like `prepare`'s."""
    hidden, weight, ref_hidden, ref_weight, labels, targets = tiny_lm()
    mask = targets.reshape(-1) != -100
    want = naive_undial(hidden, weight, ref_hidden, ref_weight, targets.reshape(-1), 10.0)[mask].mean()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    # The method picks the op's vocabulary block width itself (one block at this vocabulary):
    # blocks of 7 columns so that the blockwise sums are what is checked.
    widths = []
    monkeypatch.setattr(soft_target, "vocab_chunk", lambda rows, vocab, size: widths.append(vocab) or 7)
    h32, w32, rh32, rw32 = fp32(hidden, weight, ref_hidden, ref_weight)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[-1, -2:] = 0
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": attention_mask, "labels": labels}
    owner = target_owner(batch)
    # Rows 0, 1, 2 are forget examples 5, 0, 2: the cache holds each example's target rows by index.
    example_index = torch.tensor([5, 0, 2])
    rh3 = rh32.detach().view(3, 9, -1)
    state = UndialReference.from_rows({int(e): rh3[r][owner[r] >= 0] for r, e in enumerate(example_index)}, rw32)
    config, method = MethodConfig(name="undial"), METHODS["undial"]
    tokens = token_logprobs(h32.view(3, 9, -1), w32, targets, impl="torch")
    args = (tokens, h32.view(3, 9, -1), w32, targets, owner)
    got = method.forget_term(config, state, *args, slice(0, 3), example_index)
    got_grads = torch.autograd.grad(got, (h32, w32))
    assert widths == [41]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-3)
    # A micro-batch without forget rows (a stand-in set) scores no token: the term is 0, not NaN.
    assert float(method.forget_term(config, state, *args, slice(0, 0), example_index).detach()) == 0.0
    # Rows whose examples the cache does not hold (the data changed after the reference pass).
    with pytest.raises(ValueError, match="forget example 1 has 0 cached reference answer tokens"):
        method.forget_term(config, state, *args, slice(0, 3), torch.tensor([5, 1, 2]))


def test_method_term_reads_the_reference_rows_of_the_scored_positions():
    """forget_token_term for undial: the mean over the scored (forget) positions, the reference
    hidden states handed over compactly in row-major order of the scored positions."""
    hidden, weight, ref_hidden, ref_weight, _, targets = tiny_lm()
    config = MethodConfig(name="undial", undial_beta=3.0)
    scored = targets != -100
    scored[0] = False  # row 0 is not a forget example
    h3, rh3 = hidden.view(3, 9, -1), ref_hidden.view(3, 9, -1)
    want = naive_undial(h3[scored], weight, rh3[scored], ref_weight, targets[scored], 3.0).mean()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    h32, w32 = fp32(hidden, weight)
    tokens = torch.zeros(3, 9)
    reference = (rh3[scored].float(), ref_weight.float())
    got = forget_token_term(config, tokens, h32.view(3, 9, -1), w32, targets, scored, reference)
    got_grads = torch.autograd.grad(got, (h32, w32))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for g, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-3)
    terms = loss_terms(config, {"forget": tokens.sum(1)}, {"forget": scored.sum(1)}, {}, token_term=got)
    assert set(terms) == {"undial"} and terms["undial"].normalizer == "forget_tokens"
    with pytest.raises(ValueError, match="needs the reference hidden states"):
        forget_token_term(config, tokens, h32.view(3, 9, -1), w32, targets, scored)
    with pytest.raises(ValueError, match="one row per scored position"):
        undial_token_values(h32.view(3, 9, -1), w32, targets, scored, reference[0][:-1], reference[1])
    assert METHODS["undial"].sets == ("forget",) and METHODS["undial"].ref_sets == ()
    assert MethodConfig(name="undial").undial_beta == 10.0


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_method_config_names_undial_beta(value):
    with pytest.raises(ConfigError, match=r"method\.undial_beta"):
        MethodConfig(name="undial", undial_beta=value)


def test_reference_gather_and_its_errors():
    hidden = torch.arange(12.0).view(6, 2)
    # Examples 0 (2 targets), 1 (none), 2 (4 targets).
    reference = UndialReference(hidden, torch.tensor([0, 2, 2]), torch.tensor([2, 0, 4]), torch.ones(5, 2))
    rows, weight = reference.gather(torch.tensor([2, 0, 2]), torch.tensor([4, 1, 1]))
    assert rows.tolist() == [[10.0, 11.0], [0.0, 1.0], [4.0, 5.0]] and weight is reference.weight
    assert reference.gather(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))[0].shape == (0, 2)
    assert reference.nbytes == (12 + 10) * 4
    with pytest.raises(ValueError, match="forget example 0 has 2 cached reference answer tokens, but target 3"):
        reference.gather(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="forget example 1 has 0"):
        reference.gather(torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="forget example 7 has 0"):
        reference.gather(torch.tensor([7]), torch.tensor([1]))


def test_reference_pass_caches_the_final_hidden_states_of_the_answer_tokens(tiny_llama):
    model = tiny_llama(23)
    items = []
    for index, (length, prompt) in enumerate([(7, 3), (5, 4), (9, 2), (4, 3)]):
        ids = torch.randint(1, 23, (length,)).tolist()
        items.append({"index": index, "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    config = SimpleNamespace(
        model=SimpleNamespace(impl="torch", lora=SimpleNamespace(enabled=False)),
        data=SimpleNamespace(batch_size=1),
        run=SimpleNamespace(seed=0),
        method=MethodConfig(name="undial"),
    )
    reference = prepare_method(config, method_for("undial"), model, items, pad_token_id=0)
    assert reference.count.tolist() == [4, 1, 7, 1]  # targets after the shift: length - prompt
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item["input_ids"]])
            final = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
            prompt = item["labels"].count(-100)
            ranks = torch.arange(1, len(ids[0]) - prompt + 1)
            rows, _ = reference.gather(torch.full_like(ranks, item["index"]), ranks)
            # hidden[t] predicts token t + 1: the answer's targets are predicted from prompt - 1 on.
            torch.testing.assert_close(rows, final[prompt - 1 : -1], atol=1e-5, rtol=1e-5)
    # A copy of the initial lm_head: training the model does not move it.
    before = reference.weight.clone()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(reference.weight, before)
