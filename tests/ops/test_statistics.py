"""token_statistics: every impl against a float64 full-logits reference; ties; ignored positions; bad
inputs; the chunked path never allocates a [tokens x vocab] tensor.

Triton runs under the interpreter on CPU (conftest.py): its shapes stay tiny.
"""

import pytest
import torch
from helpers import TRITON_DEVICE, assert_as_good_as_torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnpo.ops import statistics as stats_module
from fastnpo.ops import token_statistics
from fastnpo.ops.statistics import naive_statistics

IGNORE = -100
TOL = {torch.float32: 5e-4, torch.bfloat16: 1e-2}
FIELDS = ("logprob", "mean", "second_moment", "variance")


def reference64(hidden, weight, labels, ignore_index=IGNORE):
    """float64 statistics from full logits; 0 / False where ignored. Argmax: torch.argmax (first max)."""
    logits = hidden.double() @ weight.double().T
    logp = logits.log_softmax(-1)
    p = logp.exp()
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    values = {
        "logprob": logp.gather(-1, safe[..., None])[..., 0],
        "mean": (p * logp).sum(-1),
        "second_moment": (p * logp.square()).sum(-1),
    }
    values["variance"] = (p * (logp - values["mean"][..., None]).square()).sum(-1)
    values = {k: v.masked_fill(ignored, 0.0) for k, v in values.items()}
    values["is_argmax"] = (logits.argmax(-1) == labels) & ~ignored
    top2 = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    values["gap"] = (top2[..., 0] - top2[..., -1]) if logits.shape[-1] > 1 else torch.full_like(top2[..., 0], 1e9)
    return values


def same_dtype_torch(hidden, weight, labels):
    """What full-logits PyTorch computes in the inputs' dtype (logits rounded to it, then fp32)."""
    logits = (hidden @ weight.T).float()
    logp = logits.log_softmax(-1)
    p = logp.exp()
    ignored = labels == IGNORE
    safe = labels.masked_fill(ignored, 0)
    mean, second = (p * logp).sum(-1), (p * logp.square()).sum(-1)
    return {
        "logprob": logp.gather(-1, safe[..., None])[..., 0].masked_fill(ignored, 0.0),
        "mean": mean.masked_fill(ignored, 0.0),
        "second_moment": second.masked_fill(ignored, 0.0),
        "variance": (second - mean.square()).masked_fill(ignored, 0.0),  # what open-unlearning computes
    }


def make_inputs(n, d, v, dtype, device, *, scale=1.0, ignore_fraction=0.3, seed=0):
    """Random hidden / weight; half the kept labels are the row's argmax (so is_argmax is often True)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, dtype=torch.float64, generator=gen) * scale).to(dtype)
    weight = (torch.randn(v, d, dtype=torch.float64, generator=gen) / d**0.5).to(dtype)
    best = (hidden.double() @ weight.double().T).argmax(-1)
    labels = torch.where(torch.rand(n, generator=gen) < 0.5, best, torch.randint(0, v, (n,), generator=gen))
    labels[torch.rand(n, generator=gen) < ignore_fraction] = IGNORE
    return hidden.to(device), weight.to(device), labels.to(device)


def check(stats, hidden, weight, labels):
    ref = reference64(hidden.cpu(), weight.cpu(), labels.cpu())
    same = same_dtype_torch(hidden.cpu(), weight.cpu(), labels.cpu())
    tol = TOL[hidden.dtype]
    for name in FIELDS:
        ours = getattr(stats, name)
        assert ours.dtype == torch.float32 and ours.shape == labels.shape, name
        assert torch.isfinite(ours).all(), name
        assert_as_good_as_torch(ours, same[name], ref[name], tol, name)
    assert stats.is_argmax.dtype == torch.bool and stats.is_argmax.shape == labels.shape
    # Compare the argmax decision wherever the top two logits are not within rounding of each other.
    clear = ref["gap"] > (1e-4 if hidden.dtype == torch.float32 else 1e-2)
    assert torch.equal(stats.is_argmax.cpu()[clear], ref["is_argmax"][clear])
    ignored = labels.cpu() == IGNORE
    for name in FIELDS:
        assert (getattr(stats, name).cpu()[ignored] == 0).all()
    assert not stats.is_argmax.cpu()[ignored].any()


# (N, D, V): N = 1, D not a multiple of 16, V prime.
SHAPES = [(1, 16, 17), (19, 37, 101), (64, 20, 1031)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
# chunk 512: blocks of 2 rows x 256 columns, many rescalings; None: the default blocks
@pytest.mark.parametrize(("impl", "chunk"), [("torch", None), ("torch", 512), ("naive", None)])
def test_matches_float64_reference(impl, chunk, shape, dtype, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", chunk)
    hidden, weight, labels = make_inputs(*shape, dtype, "cpu", scale=2.0, seed=shape[2])
    check(token_statistics(hidden, weight, labels, impl=impl), hidden, weight, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 17), (21, 24, 131)], ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_float64_reference(shape, dtype):
    hidden, weight, labels = make_inputs(*shape, dtype, TRITON_DEVICE, scale=2.0, seed=shape[2])
    check(token_statistics(hidden, weight, labels, impl="triton"), hidden, weight, labels)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_triton_vocabulary_splits_agree(num_splits):
    # 131 columns in tiles of 32 = 5 tiles: 7 splits leave some slices empty.
    from fastnpo.kernels.statistics_forward import statistics_forward

    hidden, weight, labels = make_inputs(9, 16, 131, torch.float32, TRITON_DEVICE, ignore_fraction=0.0, seed=3)
    row_ids = torch.arange(9, device=TRITON_DEVICE)
    got = statistics_forward(hidden, weight, row_ids, labels, num_splits=num_splits)
    want = naive_statistics(hidden.cpu().double(), weight.cpu().double(), row_ids.cpu(), labels.cpu())
    for ours, ref in zip(got[:5], want[:5], strict=True):
        torch.testing.assert_close(ours.double().cpu(), ref.double(), atol=2e-5, rtol=1e-5)
    assert torch.equal(got[5].cpu(), want[5])


def test_large_logits_stay_accurate():
    # Peaked rows (max |logit| ~ 100): the rescaled sums must neither overflow nor lose the tail.
    hidden, weight, labels = make_inputs(33, 24, 257, torch.float32, "cpu", scale=30.0, seed=7)
    assert (hidden @ weight.T).abs().max() > 50
    check(token_statistics(hidden, weight, labels, impl="torch"), hidden, weight, labels)


def integer_inputs(n, v, d=6, seed=0):
    """Small-integer hidden and weight: every logit is an exact integer in fp32 whatever the summation
    order, so exact ties are real ties on every path."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, d), generator=gen).float()
    weight = torch.randint(-1, 2, (v, d), generator=gen).float()
    return hidden, weight


@pytest.mark.parametrize("impl", ["torch", "naive", "triton"])
def test_ties_count_for_the_first_maximal_index_only(impl, monkeypatch):
    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", 512)  # blocks of 256 columns on the torch path
    v = 300 if impl != "triton" else 70  # triton: tiles of 32 columns
    hidden, weight = integer_inputs(8, v)
    # Row 0: columns 5 and 7 (same tile / block), 40 and v-1 (other tiles / blocks / splits) tie for a
    # clear maximum.
    weight[[5, 7, 40, v - 1]] = 2.0
    hidden[0] = 1.0
    logits = hidden.double() @ weight.double().T
    assert (logits[0] == logits[0].max()).nonzero()[:, 0].tolist() == [5, 7, 40, v - 1]
    labels = logits.argmax(-1)  # torch.argmax: the first maximal index
    labels[1] = (logits[1] == logits[1].max()).nonzero()[-1, 0]  # the last of a tie (or the argmax)
    for label, want in ((5, True), (7, False), (40, False), (v - 1, False)):
        device = TRITON_DEVICE if impl == "triton" else "cpu"
        y = labels.clone()
        y[0] = label
        stats = token_statistics(hidden.to(device), weight.to(device), y.to(device), impl=impl)
        assert bool(stats.is_argmax[0]) is want, label
        assert torch.equal(stats.is_argmax.cpu(), logits.argmax(-1) == y)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_integer_logits_argmax_matches_torch_everywhere(impl, monkeypatch):
    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", 512)
    hidden, weight = integer_inputs(40, 613, seed=1)
    logits = hidden.double() @ weight.double().T
    labels = torch.where(torch.arange(40) % 2 == 0, logits.argmax(-1), torch.randint(0, 613, (40,)))
    stats = token_statistics(hidden, weight, labels, impl=impl)
    assert torch.equal(stats.is_argmax, logits.argmax(-1) == labels)
    assert stats.is_argmax.sum() >= 20


@pytest.mark.parametrize("impl", ["torch", "naive", "triton"])
def test_ignored_positions_and_all_ignored(impl):
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    hidden, weight, labels = make_inputs(6, 16, 37, torch.float32, device, ignore_fraction=0.0)
    labels[[1, 4]] = IGNORE
    stats = token_statistics(hidden, weight, labels, impl=impl)
    check(stats, hidden, weight, labels)
    none = token_statistics(hidden, weight, torch.full_like(labels, IGNORE), impl=impl)
    assert all((getattr(none, f) == 0).all() for f in FIELDS) and not none.is_argmax.any()
    other = token_statistics(hidden, weight, labels.masked_fill(labels == IGNORE, -1), ignore_index=-1, impl=impl)
    for a, b in zip(other, stats, strict=True):
        assert torch.equal(a, b)


def test_shift_and_batch_shape():
    hidden, weight, labels = make_inputs(2 * 7, 16, 53, torch.float32, "cpu", ignore_fraction=0.2)
    hidden, labels = hidden.view(2, 7, 16), labels.view(2, 7)
    shifted = token_statistics(hidden, weight, labels, shift=True)
    aligned = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    plain = token_statistics(hidden, weight, aligned)
    assert shifted.logprob.shape == (2, 7)
    for a, b in zip(shifted, plain, strict=True):
        assert torch.equal(a, b)
    assert (shifted.logprob[:, -1] == 0).all()
    check(plain, hidden, weight, aligned)
    # Variance of log p: >= 0 and the difference of the moments.
    torch.testing.assert_close(plain.variance, (plain.second_moment - plain.mean**2).clamp(min=0), atol=1e-4, rtol=1e-4)
    assert (plain.variance >= 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_variance_of_a_flat_distribution_keeps_its_digits(impl):
    # Nearly uniform rows (|mean| ~ log V = 7, variance ~ 1e-5): second_moment - mean^2 in fp32 would
    # lose it to cancellation; the variance centred on the max logit keeps it.
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    v = 1031 if impl == "torch" else 67
    hidden, weight, labels = make_inputs(7, 16, v, torch.float32, device, scale=0.002, ignore_fraction=0.0)
    stats = token_statistics(hidden, weight, labels, impl=impl)
    ref = reference64(hidden.cpu(), weight.cpu(), labels.cpu())["variance"]
    assert ref.max() < 1e-4
    torch.testing.assert_close(stats.variance.double().cpu(), ref, rtol=1e-3, atol=1e-9)
    naive_error = ((stats.second_moment - stats.mean**2).double().cpu() - ref).abs().max()
    assert (stats.variance.double().cpu() - ref).abs().max() < naive_error / 10


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_chunked_path_never_allocates_tokens_by_vocab(impl, monkeypatch):
    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", 4096)
    n, d, v = 64, 8, 1031  # weight (V x D) and hidden stay well under N x V / 4
    hidden, weight, labels = make_inputs(n, d, v, torch.float32, "cpu", ignore_fraction=0.0)
    with LargestTensor() as mode:
        token_statistics(hidden, weight, labels, impl=impl)
    if impl == "naive":  # the check can fail: full logits are seen
        assert mode.largest >= n * v
    else:
        assert mode.largest <= 2 * 4096 < n * v // 4  # the two reused block buffers


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda h, w, y: ("h", w, y), TypeError, "hidden must be a torch.Tensor"),
        (lambda h, w, y: (h, w[:, :-1], y), ValueError, "weight has hidden_dim"),
        (lambda h, w, y: (h, w.double(), y), TypeError, "weight dtype"),
        (lambda h, w, y: (h.int(), w, y), TypeError, "hidden must be float32"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be an integer tensor"),
        (lambda h, w, y: (h, w, y[:-1]), ValueError, "labels shape"),
        (lambda h, w, y: (h, w, y.clamp(min=0) + 100), ValueError, "labels contains"),
        (lambda h, w, y: (h, w[0], y), ValueError, "weight must be 2-D"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    hidden, weight, labels = make_inputs(5, 8, 11, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        token_statistics(*change(hidden, weight, labels))


def test_bad_impl_and_shift_shape():
    hidden, weight, labels = make_inputs(5, 8, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        token_statistics(hidden, weight, labels, impl="split")
    with pytest.raises(ValueError, match="hidden must have 3 dimensions"):
        token_statistics(hidden, weight, labels, shift=True)
