"""The trainer's two loss designs (model.loss_design): the one-pass design (ops.example_loss, the
gradients computed in the forward call) against the two-call path (token log-probs, then autograd
through the method's loss), for every method whose loss is a sum of per-example terms, and for the
token-level ones whose per-token terms the one-pass design's row statistics give: elementwise in the
token log-probs (WGA, SatImp), or CE-U's per-token loss (its label-excluded statistics)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import LowPrecisionOperands, tiny_alternates, tiny_config
from safetensors.torch import load_file

from fastnpo.methods import METHODS
from fastnpo.modeling import uses_one_pass
from fastnpo.train import train
from fastnpo.train.config import ConfigError

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

REPO = Path(__file__).resolve().parents[2]
SEPARABLE = ["finetune", "ga", "graddiff", "npo", "npo_rt", "simnpo"]
TOKEN_SEPARABLE = ["ceu", "satimp", "wga"]
PAIRED = ["altpo", "idkdpo"]  # sums of per-pair terms: chunks of whole pairs
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of ~24 rows (one or two examples): the one-pass design then runs several chunks per
    micro-batch, each computing its gradients before the later examples are seen."""
    from fastnpo.ops import one_pass

    monkeypatch.setattr(one_pass, "chunk_budget", lambda vocab_size, chunk_bytes: 4 * vocab_size * 24)


def config_for(tiny, out, **extra):
    return tiny_config(tiny, out, **{"optim.max_steps": 3, **extra})


def trained(tiny, out, **extra) -> dict:
    train(config_for(tiny, out, **extra))
    return load_file(Path(out) / "final" / "model.safetensors")


def test_the_separable_methods_are_the_ones_the_issue_names():
    assert sorted(name for name, method in METHODS.items() if method.separable) == SEPARABLE
    assert sorted(name for name, method in METHODS.items() if method.token_separable) == TOKEN_SEPARABLE
    assert sorted(name for name, method in METHODS.items() if method.pairs) == PAIRED
    assert sorted(name for name, method in METHODS.items() if method.one_pass) == sorted(
        SEPARABLE + TOKEN_SEPARABLE + PAIRED
    )


# SatImp's default weight p^5 (1 - p) is ~0 on a random model: its forget term would not move anything.
OPTIONS = {"satimp": {"method.satimp_beta1": 0.5}}


@pytest.mark.parametrize("method", [*SEPARABLE, *TOKEN_SEPARABLE, *PAIRED])
def test_one_pass_trains_to_the_parameters_of_the_two_call_path(tiny, tmp_path, method):
    options = {**OPTIONS.get(method, {}), **({"data.alternate": tiny_alternates(tiny)} if method == "altpo" else {})}
    weights = {
        design: trained(tiny, tmp_path / design, **{"method.name": method, "model.loss_design": design, **options})
        for design in ("two_call", "one_pass")
    }
    moved = 0.0
    for name, two_call in weights["two_call"].items():
        torch.testing.assert_close(weights["one_pass"][name], two_call, atol=2e-5, rtol=1e-4, msg=name)
        moved = max(moved, float((two_call - load_file(Path(tiny["base"]) / "model.safetensors")[name]).abs().max()))
    assert moved > 1e-4  # three steps at lr 1e-3 moved the parameters: the comparison is not of two copies


# ceu: the token-level route (wga's, plus its own row statistics); idkdpo: chunks of whole pairs
@pytest.mark.parametrize("method", ["npo_rt", "ceu", "idkdpo"])
@pytest.mark.parametrize("extra", [{"data.packing": True, "data.pack_tokens": 128}, {"optim.grad_accum": 2}])
def test_one_pass_agrees_on_packed_rows_and_accumulated_micro_batches(tiny, tmp_path, extra, method):
    weights = {
        design: trained(tiny, tmp_path / design, **{"method.name": method, "model.loss_design": design, **extra})
        for design in ("two_call", "one_pass")
    }
    for name, two_call in weights["two_call"].items():
        torch.testing.assert_close(weights["one_pass"][name], two_call, atol=2e-5, rtol=1e-4, msg=name)


# the two kernel variants: the plain epilogue (npo_rt) and CE-U's without_label one (WGA's token-level
# route and IdkDPO's groups change only which rows and gradients reach the same plain kernels)
@pytest.mark.parametrize("method", ["npo_rt", "ceu"])
def test_one_pass_through_the_epilogue_kernels_trains_like_two_call(tiny, tmp_path, monkeypatch, method):
    """A bf16 model with the CUDA path's low-precision operands emulated (helpers.LowPrecisionOperands),
    so the one-pass chunks run kernels/sequence_epilogue.py (CE-U: its without_label variants) under
    the Triton interpreter: each step's loss and gradient norm equal two_call's to bf16 tolerance,
    and after 2 AdamW steps the parameters differ by at most 2 lr a step (AdamW moves a parameter by
    ~lr whatever its gradient's size, so a near-zero gradient whose sign rounding flips moves it the
    other way) plus a bf16 rounding."""
    from fastnpo.kernels import sequence_epilogue
    from fastnpo.ops import one_pass

    monkeypatch.setattr(one_pass, "Matmuls", LowPrecisionOperands)
    launched = []
    real = sequence_epilogue.row_statistics
    monkeypatch.setattr(sequence_epilogue, "row_statistics", lambda *a, **k: launched.append(k) or real(*a, **k))
    extra = {"method.name": method, "model.dtype": "bfloat16", "optim.max_steps": 2}
    runs = {}
    for design in ("two_call", "one_pass"):
        train(config_for(tiny, tmp_path / design, **{**extra, "model.loss_design": design}))
        lines = (tmp_path / design / "metrics.jsonl").read_text().splitlines()
        weights = load_file(tmp_path / design / "final" / "model.safetensors")
        runs[design] = ([json.loads(line) for line in lines], weights)
    assert launched and all(k.get("without_label", False) == (method == "ceu") for k in launched)
    (two_call, two_call_weights), (ours, our_weights) = runs["two_call"], runs["one_pass"]
    assert len(ours) == len(two_call) == 2
    for mine, theirs in zip(ours, two_call, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-2, abs=1e-3)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=3e-2)
    for name, weight in two_call_weights.items():
        torch.testing.assert_close(our_weights[name].float(), weight.float(), atol=2 * 2 * 1e-3, rtol=2**-8, msg=name)


def test_the_one_pass_route_runs_the_one_pass_design(tiny, tmp_path, monkeypatch):
    import fastnpo.ops.autograd as autograd
    from fastnpo.ops import one_pass

    calls = []
    original = autograd.one_pass_sequence_loss
    chunk_rows = one_pass.chunk_rows

    def counted(*args, **kwargs):
        calls.append(kwargs.get("compute_dw"))
        return original(*args, **kwargs)

    def chunks(*args, **kwargs):
        bounds = chunk_rows(*args, **kwargs)
        assert len(bounds) > 3  # several chunks per call
        return bounds

    monkeypatch.setattr(one_pass, "chunk_rows", chunks)

    monkeypatch.setattr(autograd, "one_pass_sequence_loss", counted)
    trained(tiny, tmp_path / "one_pass", **{"method.name": "npo_rt", "model.loss_design": "one_pass"})
    assert calls == [True, True, True]  # one call per step (grad_accum 1), with the weight gradient
    calls.clear()
    trained(tiny, tmp_path / "two_call", **{"method.name": "npo_rt", "model.loss_design": "two_call"})
    assert calls == []


def test_auto_is_one_pass_on_cuda_for_separable_methods_only(tiny, tmp_path):
    cases = [("npo_rt", True), ("simnpo", True), ("wga", True), ("idkdpo", True), ("undial", False), ("ceu", True)]
    for method, expected in cases:
        config = config_for(tiny, tmp_path, **{"method.name": method})
        assert uses_one_pass(config.model.loss_design, CUDA, METHODS[method].one_pass) is expected
        assert uses_one_pass(config.model.loss_design, CPU, METHODS[method].one_pass) is False
    config = config_for(tiny, tmp_path, **{"model.loss_design": "two_call"})
    assert uses_one_pass(config.model.loss_design, CUDA, METHODS["npo"].one_pass) is False


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"model.loss_design": "onepass"}, r"model\.loss_design: must be one of \('auto', 'one_pass', 'two_call'\)"),
        ({"model.loss_design": "one_pass", "method.name": "rmu"}, r"model\.loss_design: needs a loss that is a sum"),
        ({"model.loss_design": "one_pass", "method.name": "npo_kl"}, r"one_pass with method\.name=npo_kl"),
        ({"model.loss_design": "one_pass", "method.name": "undial"}, r"one_pass with method\.name=undial"),
    ],
)
def test_a_design_the_method_cannot_use_is_refused_naming_the_key(tiny, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        config_for(tiny, tmp_path, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["npo_rt", "wga", "ceu"])
def test_one_pass_on_cuda_trains_like_two_call(tiny, tmp_path, method):
    """On CUDA (cuBLAS, the Triton epilogue kernels where the operands are low precision): auto takes
    the one-pass design and trains where two_call does, to GPU reduction-order tolerance."""
    weights = {
        design: trained(
            tiny, tmp_path / design, **{"method.name": method, "model.loss_design": design, "run.device": "cuda"}
        )
        for design in ("two_call", "auto")
    }
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    for name, two_call in weights["two_call"].items():
        moved = float((two_call - initial[name]).abs().max())
        assert moved > 1e-5, name
        torch.testing.assert_close(weights["auto"][name], two_call, atol=0.01 * moved, rtol=0, msg=name)
