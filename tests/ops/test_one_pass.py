"""design="one_pass" (fastnpo/ops/one_pass.py): a per-sequence loss and its gradients in one sweep of
chunks of whole sequences.

Everything is checked against a plain float64 formula written here (full logits, autograd), a
low-precision result judged against plain torch in the same dtype (tests/ops/test_logprobs.py's
rule), with the chunk budget forced small so that several chunks run. Separability cannot be
detected, so the documented callers (npo_loss, ga_loss, the Hugging Face patch's NLL) are checked to
give what design="two_call" gives. The epilogue kernels (kernels/sequence_epilogue.py, taken with bf16 /
fp16 operands where Triton runs) run here under the interpreter on tiny odd shapes, alone against
float64 and inside the design with the CUDA path's low-precision operands emulated.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    LowPrecisionOperands,
    assert_as_good_as_torch,
    fused_loss_fn,
    sequence_logprobs_plain,
    token_logprobs_plain,
    value_and_grads,
)

import fastnpo
from fastnpo import losses
from fastnpo.kernels import sequence_epilogue
from fastnpo.ops import fused_sequence_loss, one_pass

IGNORE = -100
BETA = 0.37
DTYPES = [(torch.float32, 5e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]


def make_batch(b, t, d, v, dtype, device="cpu"):
    """hidden [b*t, d], weight [v, d], aligned labels [b*t]: each row a prompt prefix of ignored labels
    (the first row's is the whole row when b > 1: a sequence with no kept row), the last row right
    padding."""
    hidden = (torch.randn(b * t, d, dtype=torch.float64) * 2).to(dtype).to(device)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (b, t))
    for row in range(b):
        labels[row, : int(torch.randint(1, t - 1, ()))] = IGNORE
    if b > 1:
        labels[0] = IGNORE
    labels[-1, -1] = IGNORE
    return hidden, weight, labels.reshape(-1).to(device)


def npo_closure(ref_logps, weights):
    return lambda logps: losses.npo_from_logprobs(logps, ref_logps, beta=BETA, weights=weights)


def check_against_float64(hidden, weight, labels, t, tol, chunk_bytes, upstream, **requires_grad):
    """One pass vs float64 and vs plain torch in the inputs' dtype: an NPO loss with weights."""
    b = labels.numel() // t
    true_logps = sequence_logprobs_plain(hidden.double(), weight.double(), labels, t, torch.float64)
    noise, weights = torch.randn(b, dtype=torch.float64) * 3, torch.rand(b) * 2
    loss_fn = npo_closure((true_logps + noise.to(labels.device)).float(), weights.to(labels.device))
    design = fused_loss_fn(labels, t, loss_fn, chunk_bytes, "one_pass")
    ours = value_and_grads(design, hidden, weight, upstream, **requires_grad)
    plain = value_and_grads(
        lambda h, w: loss_fn(sequence_logprobs_plain(h, w, labels, t, torch.float32)),
        hidden,
        weight,
        upstream,
        **requires_grad,
    )
    ref = value_and_grads(
        lambda h, w: loss_fn(sequence_logprobs_plain(h, w, labels, t, torch.float64)),
        hidden.double(),
        weight.double(),
        upstream,
        **requires_grad,
    )
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    assert_as_good_as_torch(ours[0], plain[0], ref[0], tol, "loss")
    for got, same_dtype, want, like, name in zip(
        ours[1:], plain[1:], ref[1:], (hidden, weight), ("dH", "dW"), strict=True
    ):
        if want is None:
            assert got is None, f"{name} computed for an input that does not require grad"
            continue
        assert got.dtype == like.dtype and torch.isfinite(got).all()
        assert_as_good_as_torch(got, same_dtype, want, tol, name)
    return ours


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("v", [33, 257])
@pytest.mark.parametrize("d", [16, 40])
@pytest.mark.parametrize("t", [5, 17])
@pytest.mark.parametrize("b", [1, 3])
def test_one_pass_matches_float64(b, t, d, v, dtype, tol):
    hidden, weight, labels = make_batch(b, t, d, v, dtype)
    # Half the kept rows per chunk: never everything in one chunk when two sequences have rows;
    # a sequence over the budget goes alone, short ones share.
    sequence_ids = (labels != IGNORE).nonzero()[:, 0] // t
    chunk_bytes = 4 * v * max(1, sequence_ids.numel() // 2)
    chunks = len(one_pass.chunk_rows(sequence_ids, b, v, chunk_bytes)) - 1
    assert chunks == 1 if b == 1 else chunks >= 2
    _, dh, _ = check_against_float64(hidden, weight, labels, t, tol, chunk_bytes, upstream=-1.7)
    assert torch.all(dh[labels == IGNORE] == 0), "an ignored row got a gradient"


def test_long_sequences_sum_as_accurately_as_the_two_call_path():
    """fp32, 1000-token sequences: one pass's per-sequence sums (chunk by chunk, index_add_) within
    the error of the two-call path's (pairwise) sums against float64; fp32 sums added one token at a
    time drifted 2-6 ulps of the sum (the bench's 512x16x8200 check failed on it)."""
    b, t, d, v = 4, 1000, 16, 257
    hidden, weight, labels = make_batch(b, t, d, v, torch.float32)
    seen = {}

    def keep(logps):
        seen["logps"] = logps
        return logps.sum()

    args = dict(ignore_index=IGNORE, impl="torch", filter_eps=None, chunk_bytes=4 * v * 600)
    fused_sequence_loss(hidden, weight, labels, t, keep, design="one_pass", **args)
    one_pass_sums = seen["logps"]
    fused_sequence_loss(hidden, weight, labels, t, keep, design="two_call", **args)
    two_call_sums = seen["logps"]
    logits = hidden.double() @ weight.double().T
    kept = labels != IGNORE
    exact = torch.zeros(labels.shape, dtype=torch.float64)
    exact[kept] = logits.log_softmax(-1)[kept].gather(1, labels[kept, None])[:, 0]
    exact = exact.view(b, t).sum(1)
    ulp = torch.finfo(torch.float32).eps * exact.abs().max()
    one_pass_error = float((one_pass_sums.double() - exact).abs().max())
    two_call_error = float((two_call_sums.double() - exact).abs().max())
    assert one_pass_error <= max(two_call_error, float(ulp)), (one_pass_error, two_call_error, float(ulp))


@pytest.mark.parametrize("dtype,tol", DTYPES[:2])
@pytest.mark.parametrize("hidden_grad,weight_grad", [(True, False), (False, True), (False, False)])
def test_one_pass_computes_only_the_gradients_asked_for(hidden_grad, weight_grad, dtype, tol):
    hidden, weight, labels = make_batch(3, 9, 24, 61, dtype)
    requires = dict(hidden_grad=hidden_grad, weight_grad=weight_grad)
    check_against_float64(hidden, weight, labels, 9, tol, 4 * 61 * 4, upstream=0.6, **requires)


def test_chunks_are_whole_sequences_within_the_budget():
    # Kept rows per sequence 3, 0, 5, 2, 2, 7, 1: sequence ends 3, 3, 8, 10, 12, 19, 20.
    counts = [3, 0, 5, 2, 2, 7, 1]
    sequence_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    vocab = 10
    assert one_pass.chunk_rows(sequence_ids, 7, vocab, 4 * vocab * 5) == [0, 3, 8, 12, 19, 20]
    assert one_pass.chunk_rows(sequence_ids, 7, vocab, 4 * vocab * 8) == [0, 8, 12, 20]
    assert one_pass.chunk_rows(sequence_ids, 7, vocab, 1) == [0, 3, 8, 10, 12, 19, 20]  # one sequence each
    assert one_pass.chunk_rows(sequence_ids, 7, vocab, 2**30) == [0, 20]
    assert one_pass.chunk_rows(sequence_ids[:0], 7, vocab, 2**30) == [0]
    # Sequences after the last kept row (none here beyond 6) and an empty one inside change nothing.
    assert one_pass.chunk_rows(sequence_ids, 9, vocab, 4 * vocab * 5) == [0, 3, 8, 12, 19, 20]


def test_one_pass_without_kept_rows_or_gradients():
    hidden, weight, labels = make_batch(2, 6, 16, 37, torch.float32)
    loss_fn = lambda logps: -logps.sum() / 5
    none_kept = torch.full_like(labels, IGNORE)
    loss, dh, dw = value_and_grads(fused_loss_fn(none_kept, 6, loss_fn, None, "one_pass"), hidden, weight)
    assert loss.item() == 0 and torch.all(dh == 0) and torch.all(dw == 0)
    with torch.no_grad():
        value = fused_loss_fn(labels, 6, loss_fn, 4 * 37, "one_pass")(hidden.requires_grad_(), weight)
    assert not value.requires_grad
    want = loss_fn(sequence_logprobs_plain(hidden.double(), weight.double(), labels, 6, torch.float64))
    torch.testing.assert_close(value.double(), want, atol=1e-5, rtol=1e-5)


def test_backward_scales_the_stored_gradients():
    hidden, weight, labels = make_batch(3, 7, 16, 41, torch.float32)
    loss_fn = npo_closure(torch.randn(3) - 20, None)
    fn = fused_loss_fn(labels, 7, loss_fn, 4 * 41 * 3, "one_pass")
    once = value_and_grads(fn, hidden, weight)
    scaled = value_and_grads(fn, hidden, weight, upstream=-2.5)
    torch.testing.assert_close(scaled[1], -2.5 * once[1])
    torch.testing.assert_close(scaled[2], -2.5 * once[2])


def epilogue_launches(monkeypatch) -> list[str]:
    """Records every launch of the epilogue kernels by one_pass (which looks them up at call time)."""
    launched = []
    for name in ("row_statistics", "logits_gradient_"):
        real = getattr(sequence_epilogue, name)
        wrapper = lambda *a, _real=real, _name=name, **k: launched.append(_name) or _real(*a, **k)
        monkeypatch.setattr(sequence_epilogue, name, wrapper)
    return launched


@pytest.mark.parametrize("epilogue", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_pass_with_low_precision_operands(dtype, epilogue, monkeypatch):
    # Low-precision operands where Triton runs (the interpreter without a GPU) take the epilogue
    # kernels; where it does not (no triton installed), the torch ops.
    monkeypatch.setattr(one_pass, "Matmuls", LowPrecisionOperands)
    if epilogue == "torch":
        monkeypatch.setattr(one_pass, "epilogue_kernels", lambda device, dtype: None)
    launched = epilogue_launches(monkeypatch)
    hidden, weight, labels = make_batch(3, 17, 40, 257, dtype, device=TRITON_DEVICE)
    check_against_float64(hidden, weight, labels, 17, 1e-2, 4 * 257 * 8, upstream=1.3)
    if epilogue == "triton":  # two chunks at least, each one launch of each kernel
        chunks = len(launched) // 2
        assert chunks >= 2 and launched == ["row_statistics", "logits_gradient_"] * chunks, launched
    else:
        assert launched == []


@pytest.mark.parametrize("hidden_grad,weight_grad", [(True, False), (False, False)])
def test_epilogue_kernels_compute_only_what_is_asked_for(hidden_grad, weight_grad, monkeypatch):
    # Without gradients only the statistics kernel runs; one gradient still needs the dlogits.
    monkeypatch.setattr(one_pass, "Matmuls", LowPrecisionOperands)
    launched = epilogue_launches(monkeypatch)
    hidden, weight, labels = make_batch(3, 9, 24, 61, torch.bfloat16, device=TRITON_DEVICE)
    requires = dict(hidden_grad=hidden_grad, weight_grad=weight_grad)
    check_against_float64(hidden, weight, labels, 9, 1e-2, 4 * 61 * 4, upstream=0.6, **requires)
    assert "row_statistics" in launched
    assert ("logits_gradient_" in launched) == (hidden_grad or weight_grad), launched


def test_epilogue_kernels_run_where_triton_runs_with_low_precision_operands(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert one_pass.epilogue_kernels(cpu, torch.bfloat16) is sequence_epilogue
    assert one_pass.epilogue_kernels(cpu, torch.float16) is sequence_epilogue
    assert one_pass.epilogue_kernels(cpu, torch.float32) is None  # fp32 operands: the torch ops, in place
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert one_pass.epilogue_kernels(cpu, torch.bfloat16) is None  # no Triton on a plain CPU
    assert one_pass.epilogue_kernels(torch.device("cuda"), torch.bfloat16) is sequence_epilogue


EPILOGUE_SHAPES = [(n, v) for n in (1, 5, 17) for v in (33, 257, 1031)]  # ragged against any block


def epilogue_inputs(n, v):
    """fp32 logits [n, v] of large magnitude (row offsets ~20, spread ~4), inside a NaN-poisoned buffer
    with extra rows and columns (a read outside the rows or columns poisons the result), labels at
    the first and last columns among random ones, and every third row's label dominant (p_y ~ 1, so
    the label's gradient g * (1 - p_y) is small and a cancellation would show)."""
    logits64 = torch.randn(n, v, dtype=torch.float64) * 4 + torch.randn(n, 1, dtype=torch.float64) * 20
    labels = torch.randint(0, v, (n,))
    labels[0], labels[-1] = 0, v - 1
    dominant = torch.arange(1, n, 3)
    logits64[dominant, labels[dominant]] = logits64[dominant].amax(dim=1) + 9
    buffer = torch.full((n + 2, v + 7), float("nan"), device=TRITON_DEVICE)
    buffer[:n, :v] = logits64.float().to(TRITON_DEVICE)
    logits = buffer[:n, :v]
    return logits, logits.double().cpu(), labels.to(TRITON_DEVICE)  # the reference: the fp32 logits, exactly


@pytest.mark.parametrize("n,v", EPILOGUE_SHAPES)
def test_row_statistics_kernel_matches_float64(n, v):
    logits, exact, labels = epilogue_inputs(n, v)
    lse, target = sequence_epilogue.row_statistics(logits, labels)
    assert lse.dtype == target.dtype == torch.float32 and lse.shape == target.shape == (n,)
    ref = exact.logsumexp(dim=1)
    # a few fp32 roundings of lse (its size included), far inside the design's rule, also checked
    err = (lse.double().cpu() - ref).abs()
    assert torch.all(err <= 2.0**-21 * (ref.abs() + 1)), (err, ref)
    assert_as_good_as_torch(lse, logits.logsumexp(dim=1), ref, 5e-4, "lse")
    assert torch.equal(target.cpu(), logits.cpu().gather(1, labels.cpu()[:, None])[:, 0])  # a load: exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", EPILOGUE_SHAPES)
def test_in_place_logits_gradient_kernel_matches_float64(n, v, dtype):
    # The in-place kernel (one chunk buffer: bf16 / fp16 dlogits over the first half of each fp32
    # row) against float64, inside a NaN-poisoned buffer whose extra rows and columns must survive.
    logits, exact, labels = epilogue_inputs(n, v)
    buffer = logits.untyped_storage()
    lse64 = exact.logsumexp(dim=1)  # exact here, so only the kernel is judged
    grad64 = torch.randn(n, dtype=torch.float64) * 3
    onehot = torch.nn.functional.one_hot(labels.cpu(), v).double()
    ref = grad64[:, None] * (onehot - (exact - lse64[:, None]).exp())
    same_dtype = (grad64[:, None].float() * (onehot.float() - exact.float().softmax(dim=1))).to(dtype)
    full = torch.empty(0, device=logits.device).set_(buffer).view(n + 2, v + 7)
    lse, grad = lse64.float().to(TRITON_DEVICE), grad64.float().to(TRITON_DEVICE)
    out = sequence_epilogue.logits_gradient_(logits, labels, lse, grad, dtype)
    assert out.dtype == dtype and out.shape == (n, v) and out.data_ptr() == logits.data_ptr()
    assert out.untyped_storage().data_ptr() == buffer.data_ptr(), "not in place"
    assert torch.isfinite(out).all()
    assert torch.isnan(full[n:]).all() and torch.isnan(full[:, v:]).all(), "wrote outside the rows"
    assert_as_good_as_torch(out, same_dtype, ref, 1e-2, "dlogits")
    # Each element within one ulp of its fp32 value (the label's column included: g * (1 - p_y) formed
    # before the rounding, not g - g * p_y from rounded terms, which would be off by ~g / 512 where
    # p_y ~ 1). One ulp, not half: the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest).
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    err = (out.double().cpu() - ref).abs()
    allowed = ulp * ref.abs() + 1e-5 * grad64.abs()[:, None] + 6e-8  # fp32 p, fp16 subnormal steps
    assert torch.all(err <= allowed), (err - allowed).max()


def test_weight_gradient_rounds_once_per_chunk():
    # dW accumulates in bf16, one rounding of the running sum per chunk. Over 24 one-sequence chunks
    # its error stays near the random-walk sqrt(24) ~ 4.9 half-ulps of max |dW| (measured: at most
    # 4.2 over 60 seeds), far below the worst case of 24; one chunk rounds once (<= 1 half-ulp),
    # as an fp32 accumulator would.
    b, t, d, v = 24, 8, 32, 97
    hidden, weight, labels = make_batch(b, t, d, v, torch.bfloat16)
    labels[:t] = torch.randint(0, v, (t,))  # no empty sequence: 24 chunks
    loss_fn = lambda logps: -logps.sum() / 100
    assert len(one_pass.chunk_rows((labels != IGNORE).nonzero()[:, 0] // t, b, v, 1)) - 1 == b
    _, _, dw_ref = value_and_grads(
        lambda h, w: loss_fn(sequence_logprobs_plain(h, w, labels, t, torch.float64)),
        hidden.double(),
        weight.double(),
    )
    half_ulp = 2.0**-8 * dw_ref.abs().max().item()
    for chunk_bytes, allowed in ((1, 6.0), (None, 1.1)):
        _, _, dw = value_and_grads(fused_loss_fn(labels, t, loss_fn, chunk_bytes, "one_pass"), hidden, weight)
        err = (dw.double() - dw_ref).abs().max().item() / half_ulp
        assert err <= allowed, f"dW error {err:.2f} half-ulps of max |dW| with chunk_bytes={chunk_bytes}"


# Relative to max |gradient|: fp32 agrees to rounding; in bf16 the fused designs scale gradients
# already rounded to bf16 and one pass rounds dW once per chunk, so they differ by a few half-ulps.
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 4 * 2.0**-8)])
@pytest.mark.parametrize("caller", ["npo_loss", "ga_loss", "ga_loss unshifted", "hf_nll"])
def test_documented_callers_match_the_other_designs(caller, dtype, rel, monkeypatch):
    # design="one_pass" must equal "two_call" and "two_sweep" for every
    # caller documented as separable, with chunks smaller than a sequence.
    monkeypatch.setattr(one_pass, "CHUNK_BYTES", 4 * 53 * 3)
    monkeypatch.setattr(one_pass, "MIN_CHUNK_ROWS", 1)  # the default budget's row floor would take all rows
    b, t, d, v = 4, 11, 24, 53
    flat, weight, labels = make_batch(b, t, d, v, dtype)
    hidden, labels = flat.view(b, t, d), labels.view(b, t)
    labels[0, 2:] = torch.randint(0, v, (t - 2,))  # npo_loss needs targets in every row
    if caller == "npo_loss":
        ref_logps, weights = torch.randn(b) - 30, torch.rand(b) * 2
        call = lambda design: (
            lambda h, w: fastnpo.npo_loss(
                h, w, labels, ref_logps, beta=BETA, weights=weights, impl="torch", filter_eps=None, design=design
            )
        )
    elif caller == "ga_loss":
        call = lambda design: lambda h, w: fastnpo.ga_loss(h, w, labels, impl="torch", filter_eps=None, design=design)
    elif caller == "ga_loss unshifted":
        hidden, labels = hidden.view(2, 2, t, d), labels.view(2, 2, t)
        call = lambda design: (
            lambda h, w: fastnpo.ga_loss(h, w, labels, shift=False, impl="torch", filter_eps=None, design=design)
        )
    else:
        targets = fastnpo.ops.aligned_labels(labels, True, IGNORE).reshape(-1)
        denominator = (targets != IGNORE).sum()
        call = lambda design: (
            lambda h, w: fused_sequence_loss(
                h.reshape(b * t, d),
                w,
                targets,
                t,
                lambda logps: -logps.sum() / denominator,
                ignore_index=IGNORE,
                impl="torch",
                filter_eps=None,
                design=design,
            )
        )
    designs = ("two_call", "two_sweep", "one_pass")
    results = {design: value_and_grads(call(design), hidden, weight, upstream=0.8) for design in designs}
    for other in ("two_call", "two_sweep"):
        for got, want, name in zip(results["one_pass"], results[other], ("loss", "dH", "dW"), strict=True):
            atol = rel * want.abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0, msg=f"{name} vs {other}")


def test_bad_design_value_names_the_argument():
    # (The deprecated fused= spelling's bad values: tests/ops/test_deprecated_spellings.py.)
    hidden, weight, labels = make_batch(2, 6, 16, 37, torch.float32)
    for bad in ("one-pass", "True", 1, True, False, "cublas"):
        with pytest.raises(ValueError, match="design must be"):
            fastnpo.npo_loss(hidden.view(2, 6, 16), weight, labels.view(2, 6), torch.zeros(2), design=bad)
        with pytest.raises(ValueError, match="design must be"):
            fastnpo.ga_loss(hidden.view(2, 6, 16), weight, labels.view(2, 6), design=bad)
        with pytest.raises(ValueError, match="design must be"):
            fused_sequence_loss(
                hidden, weight, labels, 6, torch.sum, ignore_index=IGNORE, impl="torch", filter_eps=None, design=bad
            )
    with pytest.raises(ValueError, match="chunk_bytes must be"):
        fused_loss_fn(labels, 6, torch.sum, 0, "one_pass")(hidden, weight)


def test_one_pass_refuses_a_second_backward():
    hidden, weight, labels = make_batch(3, 8, 16, 37, torch.float32)
    labels[:8] = torch.randint(0, 37, (8,))
    h = hidden.view(3, 8, 16).clone().requires_grad_()
    loss = fastnpo.npo_loss(h, weight, labels.view(3, 8), torch.zeros(3), impl="torch", design="one_pass")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_one_pass_on_cuda(dtype, tol):
    # cuBLAS with out_dtype=float32 (matmuls.matmul_mode) and chunks of ~3 sequences.
    b, t, d, v = 12, 160, 256, 5003
    hidden, weight, labels = make_batch(b, t, d, v, dtype, device="cuda")
    check_against_float64(hidden, weight, labels, t, tol, 4 * v * 3 * t, upstream=0.9)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch
    import fastnpo
    from fastnpo.ops import one_pass
    from fastnpo.profiling import peak_memory_during
    torch.manual_seed(0)
    b, t, d, v = 8, 128, 64, 32768
    one_pass.CHUNK_BYTES = 4 * v * 2 * t  # two sequences: a quarter of the batch's logits
    one_pass.MIN_CHUNK_ROWS = 2 * t  # the default budget's row floor, at this V: the same two sequences
    hidden = torch.randn(b, t, d, requires_grad=True)
    weight = (torch.randn(v, d) / d**0.5).requires_grad_()
    labels = torch.randint(0, v, (b, t))

    def work(hidden, weight, labels):
        ref_logps = torch.zeros(hidden.shape[0])
        fastnpo.npo_loss(hidden, weight, labels, ref_logps, impl="torch", design="one_pass").backward()

    # Warm-up on a small input: one-time allocations (thread pools) are not the op's.
    work(hidden[:2, :8].detach().requires_grad_(), weight[:64].detach().requires_grad_(), labels[:2, :8] % 64)
    _, peak = peak_memory_during(lambda: work(hidden, weight, labels), "cpu")
    grads = hidden.grad.numel() * 4 + weight.grad.numel() * 4  # outputs: the memory floor, not extra
    print(json.dumps({"extra": peak - grads, "chunk": one_pass.CHUNK_BYTES, "logits": b * t * v * 4}))
    """
)


@pytest.mark.torchrun
def test_one_pass_holds_one_chunk_of_logits():
    # A fresh process with every large tensor its own mmap (tests/ops/test_memory.py): the peak
    # resident set is the live high-water mark. fp32 on CPU: the logits are the matmul operand, so
    # the extra memory is one chunk (a quarter of the batch's logits) and small change.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=300
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["extra"] < 1.5 * measured["chunk"] < measured["logits"], measured


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"hidden": torch.zeros(6, 4, 2)}, ValueError, r"hidden must have 2 dimensions"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, ValueError, r"targets must have shape \[6\]"),
        ({"owner": torch.zeros(6)}, TypeError, r"owner must be an integer tensor"),
        ({"owner": torch.tensor([0, 0, 2, -1, 1, 1])}, ValueError, r"owner: the kept rows' examples must be nondec"),
        ({"owner": torch.tensor([0, 0, 1, 3, -1, -1])}, ValueError, r"owner holds example 3, but num_examples is 3"),
        ({"num_examples": -1}, ValueError, r"num_examples must be an int >= 0, got -1"),
        ({"loss": None}, TypeError, r"loss_from_logprobs must be callable"),
    ],
)
def test_example_loss_names_the_bad_argument(change, error, match):
    """ops.example_loss (the trainer's one-pass route) refuses bad rows before any work."""
    from fastnpo.ops import example_loss

    args = {
        "hidden": torch.randn(6, 4),
        "weight": torch.randn(11, 4),
        "targets": torch.randint(0, 11, (6,)),
        "owner": torch.tensor([0, 0, 1, 1, 2, -1]),
        "num_examples": 3,
        "loss": torch.sum,
    }
    args.update(change)
    with pytest.raises(error, match=match):
        example_loss(args["hidden"], args["weight"], args["targets"], args["owner"], args["num_examples"], args["loss"])


def token_weighted_closure(ref_logps, t):
    """A WGA-style token-level loss: a token-weighted mean with detached weights p^0.7 over the tokens
    of the even sequences, plus an NPO term over the odd ones: separable per example and per token."""

    def loss(logps, token_logps):
        tokens = token_logps.view(-1, t)
        forget = torch.zeros_like(tokens, dtype=torch.bool)
        forget[0::2] = True
        weighted = torch.exp(0.7 * tokens.detach()) * tokens
        token_term = torch.where(forget, weighted, 0.0).sum() / 7.0
        return token_term + losses.npo_from_logprobs(logps[1::2], ref_logps[1::2], beta=BETA)

    return loss


def check_token_level(b, t, d, v, dtype, tol, chunk_bytes, upstream, device="cpu"):
    """example_loss(token_level=True), one-pass and two-call designs, against float64 and plain torch."""
    from fastnpo.ops import example_loss

    hidden, weight, labels = make_batch(b, t, d, v, dtype, device)
    owner = torch.where(labels != IGNORE, torch.arange(b * t, device=device) // t, -1)
    targets = labels.clamp(min=0)
    loss_fn = token_weighted_closure(torch.randn(b, device=device) * 3 - 20, t)

    def plain(h, w, logits_dtype):
        tokens = token_logprobs_plain(h, w, labels, logits_dtype)
        return loss_fn(tokens.view(b, t).sum(dim=1), tokens)

    ref = value_and_grads(lambda h, w: plain(h, w, torch.float64), hidden.double(), weight.double(), upstream)
    same = value_and_grads(lambda h, w: plain(h, w, torch.float32), hidden, weight, upstream)
    for design in ("one_pass", "two_call"):

        def ours(h, w, design=design):
            return example_loss(
                h, w, targets, owner, b, loss_fn, design=design, chunk_bytes=chunk_bytes, token_level=True
            )

        got = value_and_grads(ours, hidden, weight, upstream)
        for value, like, want, name in zip(got, same, ref, ("loss", "dH", "dW"), strict=True):
            assert_as_good_as_torch(value, like, want, tol, f"{design} {name}")
    return hidden, weight, targets, owner, loss_fn


@pytest.mark.parametrize("dtype,tol", DTYPES[:2])
@pytest.mark.parametrize("chunk_bytes", [None, 1])  # one chunk; one sequence per chunk
@pytest.mark.parametrize("upstream", [1.0, -0.6])
def test_token_level_loss_matches_float64(dtype, tol, chunk_bytes, upstream):
    """example_loss(token_level=True): each chunk's tokens add their own gradient; the one-pass and
    two-call designs both match float64 (several chunks, a sequence without targets, a padded row)."""
    from fastnpo.ops import example_loss

    torch.manual_seed(3)
    hidden, weight, targets, owner, loss_fn = check_token_level(4, 9, 24, 67, dtype, tol, chunk_bytes, upstream)
    with pytest.raises(ValueError, match="token_level"):
        example_loss(hidden, weight, targets, owner, 4, loss_fn, design="epilogue", token_level=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_token_level_loss_on_cuda(dtype, tol):
    # cuBLAS with out_dtype=float32 and the epilogue kernels (bf16 / fp16), chunks of ~3 sequences.
    torch.manual_seed(3)
    check_token_level(12, 160, 256, 5003, dtype, tol, 4 * 5003 * 3 * 160, upstream=0.9, device="cuda")
