"""The trainer end to end on a tiny offline setup (Mini-TOFU, a random 2-layer Llama)."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, interrupted_in_step, tiny_alternates, tiny_config, tiny_overrides
from safetensors.torch import load_file

from fastnpo.methods import METHODS
from fastnpo.train import train
from fastnpo.train.config import Config, ConfigError, load_config

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

# What a method needs on the 2-layer tiny model: RMU's defaults name layers 5-7 of a 7B model.
METHOD_OVERRIDES = {"rmu": {"method.rmu_layer": 1, "method.rmu_update_layers": "[0,1]"}}
RMU_TRAINED = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")


def method_overrides(method, tiny=None):
    extra = {"data.alternate": tiny_alternates(tiny)} if method == "altpo" else {}  # AltPO's alternate answers
    return {"method.name": method, **METHOD_OVERRIDES.get(method, {}), **extra}


def final_weights(out) -> dict:
    return load_file(Path(out) / "final" / "model.safetensors")


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_exports(tiny, tmp_path, method):
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(tiny, tmp_path / "run", **method_overrides(method, tiny)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "peak_memory_mib", "mean_forget_logp"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["reference_cache_hit"] is (False if METHODS[method].ref_sets else None)
    exported = AutoModelForCausalLM.from_pretrained(result["final"])
    initial = AutoModelForCausalLM.from_pretrained(tiny["base"])
    named = zip(exported.named_parameters(), initial.named_parameters(), strict=True)
    changed = {name: not torch.equal(a, b) for (name, a), (_, b) in named}
    if method == "rmu":  # RMU trains the chosen weights only
        assert changed == {name: name in RMU_TRAINED for name in changed}
    else:
        assert all(changed.values()), "every parameter should move after two AdamW steps"


@pytest.mark.parametrize("method", ["wga", "satimp", "ceu", "rmu", "undial"])
def test_new_methods_train_through_the_cli(tiny, tmp_path, method):
    from fastnpo.cli import main

    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    assert main(args + tiny_overrides(tiny, tmp_path / "run", **method_overrides(method, tiny))) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    term = "rmu_forget" if method == "rmu" else method
    assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r[term])) for r in records)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- first-step gradients


class CaptureGradients(torch.optim.SGD):
    """Stands in for AdamW: records the first step's gradients, then stops the run."""

    captured: typing.ClassVar[list[torch.Tensor]] = []

    def __init__(self, params, lr, betas=None, eps=None, weight_decay=None):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        CaptureGradients.captured = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        raise StopIteration


def naive_sequence_logprobs(model, items, pad_id):
    """Through the Hugging Face forward with full logits, one set at a time."""
    from fastnpo.data import collate

    batch = collate(items, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    return (logp * mask).sum(1), mask.sum(1), logits, batch["labels"]


def naive_token_logprobs(logits, labels):
    """Per-token log-probs [B, T-1] of the shifted targets and their mask, from full logits."""
    targets = labels[:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logp, targets != -100


def naive_rmu_loss(model, reference, items, pad_id, config, seed):
    """RMU from the WMDP paper with a LIVE frozen model: mean over attended positions of the
    squared distance (mean over features) of layer rmu_layer's output to c*u (forget) and, times
    alpha, to the frozen model's (retain)."""
    from fastnpo.data import collate
    from fastnpo.methods import rmu_control_vector

    def layer_output(m, set_items):
        batch = collate(set_items, pad_id)
        seen = []
        handle = m.model.layers[config.rmu_layer].register_forward_hook(lambda mod, a, out: seen.append(out))
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        out = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
        return out, batch["attention_mask"].bool()

    def mse(a, b, mask):
        return ((a - b) ** 2).mean(-1)[mask].mean()

    forget, mask = layer_output(model, items["forget"])
    control = rmu_control_vector(forget.shape[-1], config.rmu_steering_coeff, seed)
    retain, retain_mask = layer_output(model, items["retain"])
    with torch.no_grad():
        frozen, _ = layer_output(reference, items["retain"])
    return mse(forget, control, mask) + config.rmu_alpha * mse(retain, frozen, retain_mask)


def naive_method_loss(name, model, reference, items, pad_id, beta, gamma=0.0, config=None):
    """Each method's loss written from its paper formula, with a LIVE reference model."""
    if name == "rmu":
        return naive_rmu_loss(model, reference, items, pad_id, config.method, config.run.seed)
    out = {k: naive_sequence_logprobs(model, v, pad_id) for k, v in items.items() if v}
    with torch.no_grad():
        ref = {k: naive_sequence_logprobs(reference, v, pad_id) for k, v in items.items() if v}
    forget, forget_counts = out["forget"][0], out["forget"][1]
    retain_nll = -out["retain"][0].sum() / out["retain"][1].sum() if "retain" in out else None
    if name == "finetune":
        return -forget.sum() / forget_counts.sum()
    if name == "ga":
        return forget.sum() / forget_counts.sum()
    if name in ("wga", "satimp"):
        # -w * NLL per token with a stop-gradient weight, token-mean over the forget targets.
        logp, mask = naive_token_logprobs(out["forget"][2], out["forget"][3])
        p = logp.detach().exp()
        m = config.method
        w = p**m.wga_beta if name == "wga" else p**m.satimp_beta1 * (1 - p) ** m.satimp_beta2
        return (w * logp)[mask].mean() + retain_nll
    if name == "ceu":
        # Cross-entropy toward softmax(logits) with the label's logit at -inf (detached), first
        # answer token of each example skipped (open-unlearning's compute_batch_ceu).
        logits, labels = out["forget"][2], out["forget"][3]
        valid = labels != -100
        labels = labels.masked_fill(valid & (valid.cumsum(-1) <= config.method.ceu_ignore_first), -100)
        targets, shifted = labels[:, 1:], logits[:, :-1]
        keep = targets != -100
        target_logits = shifted[keep].detach().clone().scatter(-1, targets[keep][:, None], float("-inf"))
        return F.cross_entropy(shifted[keep], target_logits.softmax(-1))
    if name == "undial":
        # Cross-entropy toward softmax(reference logits - beta * onehot(label)) (detached), token-mean
        # over the forget answer tokens, the reference logits from the LIVE reference model.
        logits, labels = out["forget"][2], out["forget"][3]
        targets, shifted, ref_shifted = labels[:, 1:], logits[:, :-1], ref["forget"][2][:, :-1]
        keep = targets != -100
        onehot = F.one_hot(targets[keep], shifted.shape[-1]).to(ref_shifted.dtype)
        soft = (ref_shifted[keep] - config.method.undial_beta * onehot).softmax(-1)
        return F.cross_entropy(shifted[keep], soft)
    if name == "graddiff":
        return forget.sum() / forget_counts.sum() + retain_nll
    if name == "pdu":
        # open-unlearning's logit-margin flattening, (max - mean)^2 of the logits at the positions
        # whose own label is an answer token (no shift), + lambda (= retain_coeff at step 1) x NLL.
        logits, labels = out["forget"][2], out["forget"][3]
        margin = (logits.max(dim=-1)[0] - logits.mean(dim=-1)) ** 2
        return margin[labels != -100].mean() + config.method.retain_coeff * retain_nll
    npo = ((2 / beta) * F.softplus(beta * (forget - ref["forget"][0]))).mean()
    if name == "npo":
        return npo
    if name == "npo_rt":
        return npo + retain_nll
    if name == "npo_kl":
        # KL(pi_ref || pi_theta) per position (open-unlearning compute_kl_divergence), averaged
        # over the positions with attention (prompt and answer, no padding).
        logits, ref_logits = out["retain"][2], ref["retain"][2]
        lengths = torch.tensor([len(it["input_ids"]) for it in items["retain"]])
        mask = torch.arange(logits.shape[1])[None, :] < lengths[:, None]
        p_ref, log_p, log_ref = ref_logits.softmax(-1), logits.log_softmax(-1), ref_logits.log_softmax(-1)
        kl = (p_ref * (log_ref - log_p)).sum(-1)
        return npo + (kl * mask).sum() / mask.sum()
    if name == "simnpo":
        return (-(2 / beta) * F.logsigmoid(-(beta / forget_counts) * forget - gamma)).mean() + retain_nll
    if name == "idkdpo":
        idk = out["idk"][0]
        margin = beta * ((idk - ref["idk"][0]) - (forget - ref["forget"][0]))
        return (-(2 / beta) * F.logsigmoid(margin)).mean() + retain_nll
    if name == "altpo":  # open-unlearning's DPO trainer with the alternate answer as the winner
        alternate = out["alternate"][0]
        margin = beta * ((alternate - ref["alternate"][0]) - (forget - ref["forget"][0]))
        return (-(2 / beta) * F.logsigmoid(margin)).mean() + retain_nll
    raise AssertionError(name)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_first_step_gradient_equals_naive_with_live_reference(tiny, tmp_path, monkeypatch, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.methods import RMUState, method_for
    from fastnpo.train.setup import load_data

    beta = 0.7
    # Exponents that give the tiny model's p ~ 1e-3 weights far from 0 and 1.
    weights = {"method.wga_beta": 0.3, "method.satimp_beta1": 0.3, "method.satimp_beta2": 2.0}
    extra = {**method_overrides(method, tiny), "method.beta": beta, "optim.max_grad_norm": 0, **weights}
    config = tiny_config(tiny, tmp_path / "run", **extra)
    monkeypatch.setattr(torch.optim, "AdamW", CaptureGradients)
    with pytest.raises(StopIteration):
        train(config)

    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    reference = copy.deepcopy(model).eval()
    _, batches = load_data(config, tokenizer, method_for(method), 1)
    items = batches.next_items()
    if method == "rmu":
        RMUState(config.method, model, seed=config.run.seed).select_trainable(model)
    loss = naive_method_loss(method, model, reference, items, tokenizer.pad_token_id, beta, config=config)
    loss.backward()
    expected = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(expected) == len(CaptureGradients.captured)
    for got, want in zip(CaptureGradients.captured, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)


# ----------------------------------------------------------------------------- reference cache


def test_reference_cache_hit_then_miss_on_changed_input(tiny, tmp_path):
    cache = tmp_path / "cache"
    train(tiny_config(tiny, tmp_path / "a", **{"method.name": "npo", "run.cache_dir": cache}))
    train(tiny_config(tiny, tmp_path / "b", **{"method.name": "npo", "run.cache_dir": cache}))
    changed = {"method.name": "npo", "run.cache_dir": cache, "data.template": '"Q: {question} A:"'}
    train(tiny_config(tiny, tmp_path / "c", **changed))
    hits = [json.loads((tmp_path / r / "run_info.json").read_text())["reference_cache_hit"] for r in "abc"]
    assert hits == [False, True, False]
    assert len(list(cache.glob("ref-logprobs-*.safetensors"))) == 2


# ----------------------------------------------------------------------------- processes and resume


def run_cli(args, *, torchrun=False, env=None):
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    return subprocess.Popen(
        [*base, "-m", "fastnpo.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.torchrun
def test_two_processes_match_one_process(tiny, tmp_path):
    # Same global batch (8 forget + 8 retain examples per step): 2 ranks x 4, or 1 process x 8.
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    common = {"optim.max_steps": 3, "method.name": "npo_rt", "run.cache_dir": tmp_path / "cache"}
    two = run_cli(args + tiny_overrides(tiny, tmp_path / "two", **common), torchrun=True)
    assert two.wait(timeout=300) == 0, two.stdout.read()
    one = run_cli(
        args + tiny_overrides(tiny, tmp_path / "one", **common, **{"data.batch_size": 8, "data.retain_batch_size": 8})
    )
    assert one.wait(timeout=300) == 0, one.stdout.read()
    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["fsdp"] is True
    sharded, single = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    assert sharded.keys() == single.keys()
    for key in single:
        moved = (single[key] - initial[key]).abs().max().item()
        assert moved > 1e-3, key
        # Gradients are reduced in another order across ranks. Adam divides each gradient entry
        # by its own magnitude, so that ~1e-9 noise is amplified where an entry is near Adam's
        # eps; 1% of the distance each parameter moved bounds it with a wide margin.
        torch.testing.assert_close(sharded[key], single[key], atol=0.01 * moved, rtol=0, msg=key)


@pytest.mark.torchrun
def test_killed_run_resumes_to_the_same_parameters(tiny, tmp_path):
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    common = {
        "optim.max_steps": 40,
        "run.checkpoint_every": 3,
        "method.name": "npo_rt",
        "run.cache_dir": tmp_path / "cache",
    }
    straight = run_cli(args + tiny_overrides(tiny, tmp_path / "straight", **common))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    interrupted = run_cli(args + tiny_overrides(tiny, tmp_path / "killed", **common))
    marker = tmp_path / "killed" / "checkpoints" / "step_6" / "trainer.json"
    deadline = time.time() + 240
    while not marker.exists() and interrupted.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run must have been killed before the end"
    resumed = run_cli(args + tiny_overrides(tiny, tmp_path / "killed", **common))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("in_backward", [False, True], ids=["adamw_8bit", "adamw_8bit-in_backward"])
def test_adamw_8bit_checkpoints_and_resumes_to_the_same_parameters(tiny, tmp_path, monkeypatch, in_backward):
    """torchao's AdamW8bit keeps its learning rates as tensors (the scheduler's base_lrs too): the
    checkpoint stores them as tensors, and a run stopped after its step-2 checkpoint resumes to the
    parameters of an uninterrupted run, bit for bit."""
    pytest.importorskip("torchao", reason="optim.name=adamw_8bit needs fastnpo[lean] (in fastnpo[dev])")

    monkeypatch.setattr(torch, "compile", lambda fn=None, **options: fn)  # torchao's step, eagerly
    common = {
        "optim.name": "adamw_8bit",
        "model.dtype": "bfloat16",
        "optim.max_steps": 4,
        "run.checkpoint_every": 2,
        "method.name": "npo_rt",
        "run.cache_dir": tmp_path / "cache",
        **(IN_BACKWARD if in_backward else {}),
    }
    train(tiny_config(tiny, tmp_path / "straight", **common))

    with interrupted_in_step(3), pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny, tmp_path / "stopped", **common))
    saved = json.loads((tmp_path / "stopped" / "checkpoints" / "step_2" / "trainer.json").read_text())
    assert saved["scheduler"]["base_lrs"][0]["dtype"] == "float32", saved["scheduler"]
    train(tiny_config(tiny, tmp_path / "stopped", **common))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- bad input


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_file", "(?i)no such file"),
        ("missing_column", "answer"),
        ("empty_forget", "empty"),
        ("answer_truncated", "no answer token|zero answer|truncat"),
    ],
)
def test_bad_data_fails_before_any_work(tiny, tmp_path, case, match):
    out = tmp_path / "run"
    extra = {"method.name": "npo"}
    if case == "missing_file":
        extra["data.forget"] = tmp_path / "nope.jsonl"
    elif case == "missing_column":
        extra["data.forget"] = write_jsonl(tmp_path / "f.jsonl", [{"question": "q?", "reply": "a"}])
    elif case == "empty_forget":
        extra["data.forget"] = write_jsonl(tmp_path / "f.jsonl", [])
    else:
        long_question = "Who wrote the book? " * 40
        extra["data.forget"] = write_jsonl(tmp_path / "f.jsonl", [{"question": long_question, "answer": "Ann."}])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(tiny_config(tiny, out, **extra))
    assert not out.exists(), "nothing may be written before the inputs are known good"


def test_resume_with_another_config_is_refused_and_nothing_is_touched(tiny, tmp_path):
    out = tmp_path / "run"
    train(
        tiny_config(
            tiny,
            out,
            **{"method.name": "npo", "optim.max_steps": 4, "run.checkpoint_every": 2, "run.export": False},
        )
    )
    (out / "final").exists() and pytest.fail("export was off")
    # Pretend the run was interrupted after its checkpoint: drop the end-of-run marker.
    (out / "run_info.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match=r"method.beta: 0.1 -> 0.5"):
        train(tiny_config(tiny, out, **{"method.name": "npo", "method.beta": 0.5, "optim.max_steps": 4}))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_existing_finished_run_is_not_overwritten(tiny, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny, out, **{"method.name": "ga"}))
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(tiny, out, **{"method.name": "ga"}))
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lrate=1", "optim.lrate"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("method.name=npo2", "method.name: must be one of"),
        ("data.batch_size=0", "batch_size"),
        ("noequals", "key=value"),
        ("model.lora.r=0", None),
        ("method.wga_beta=0", "method.wga_beta: must be > 0"),
        ("method.satimp_beta1=-1", "method.satimp_beta1: must be > 0"),
        ("method.satimp_beta2=0", "method.satimp_beta2: must be > 0"),
        ("method.ceu_ignore_first=-1", "method.ceu_ignore_first: must be >= 0"),
        ("method.rmu_layer=-1", "method.rmu_layer: must be >= 0"),
        ("method.rmu_update_layers=[5,9]", r"method.rmu_update_layers: must be .* \[0, method.rmu_layer=7\]"),
        ("method.rmu_update_layers=[]", "method.rmu_update_layers"),
        ("method.rmu_params=[]", "method.rmu_params: must name at least one"),
        ("method.rmu_steering_coeff=0", "method.rmu_steering_coeff: must be > 0"),
        ("method.rmu_alpha=-1", "method.rmu_alpha: must be >= 0"),
        ("method.undial_beta=0", "method.undial_beta: must be > 0"),
        ("method.undial_beta=-3", "method.undial_beta: must be > 0"),
    ],
)
def test_config_rejects_bad_keys_and_values(override, match):
    base = ["model.name_or_path=x", "data.forget=y", "data.retain=z"]
    if match is None:  # lora.r is only checked when LoRA is on
        load_config(None, [*base, override])
        with pytest.raises(ConfigError, match=r"model\.lora\.r"):
            load_config(None, [*base, override, "model.lora.enabled=true"])
        return
    with pytest.raises((ConfigError, ValueError), match=match):
        load_config(None, [*base, override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  nam_or_path: x\n")
    with pytest.raises(ConfigError, match=r"model\.nam_or_path"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"method.rmu_layer": 7}, r"method.rmu_layer: the model has 2 decoder layers, got 7"),
        ({**METHOD_OVERRIDES["rmu"], "method.rmu_params": "[mlp.up_proj.bias]"}, r"method.rmu_params: no parameter"),
        ({**METHOD_OVERRIDES["rmu"], "model.lora.enabled": True}, r"model.lora.enabled: method rmu"),
    ],
)
def test_rmu_refuses_what_the_model_does_not_have(tiny, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny_config(tiny, tmp_path / "run", **{"method.name": "rmu", **extra}))
    assert not (tmp_path / "run" / "final").exists()


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("method", ["npo_rt", "ceu", "rmu", "undial"])
def test_packing_gives_the_same_first_step_gradient(tiny, tmp_path, monkeypatch, method):
    monkeypatch.setattr(torch.optim, "AdamW", CaptureGradients)
    grads = {}
    for packing in (False, True):
        extra = {**method_overrides(method, tiny), "data.packing": packing, "data.pack_tokens": 128}
        config = tiny_config(tiny, tmp_path / f"run{packing}", **extra, **{"optim.max_grad_norm": 0})
        with pytest.raises(StopIteration):
            train(config)
        grads[packing] = CaptureGradients.captured
    for packed, padded in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(packed, padded, atol=2e-5, rtol=2e-4)


def test_lora_trains_adapters_only_and_exports_them(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(
        tiny_config(tiny, tmp_path / "run", **{"method.name": "npo", "model.lora.enabled": True, "model.lora.r": 4})
    )
    final = Path(result["final"])
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), final)
    lora = {k: v for k, v in adapted.state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().max() > 0 for v in lora.values()), "lora_B starts at 0 and must have moved"
    merged = adapted.merge_and_unload()
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight), "the lm_head stays frozen"
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_bf16_autocast_and_activation_checkpointing_run(tiny, tmp_path):
    result = train(
        tiny_config(
            tiny,
            tmp_path / "run",
            **{
                "method.name": "npo_rt",
                "distributed.mixed_precision": "bf16",
                "distributed.activation_checkpointing": True,
            },
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert result["final"]


@pytest.mark.torchrun
def test_cache_ref_command_builds_verifies_then_hits(tiny, tmp_path):
    args = [
        "cache-ref",
        "--config",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "--verify",
        "3",
        *tiny_overrides(tiny, tmp_path / "run", **{"method.name": "idkdpo", "run.cache_dir": tmp_path / "cache"}),
    ]
    outputs = []
    for _ in range(2):
        process = run_cli(args)
        out = process.communicate(timeout=300)[0]
        assert process.returncode == 0, out
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["hit"] for o in outputs] == [False, True]
    assert outputs[0]["verify"]["ok"] and set(outputs[0]["verify"]["sets"]) == {"forget", "idk"}
    assert not (tmp_path / "run").exists(), "cache-ref writes the cache only"


def test_trainer_cache_is_shared_with_the_hf_integration(tiny, tmp_path):
    # Both routes key the cache with refcache.ref_cache_parts: what `fastnpo train` computed, the
    # Trainer integration finds (and the other way round), instead of a second reference pass.
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.integrations.hf import add_reference_logprobs
    from fastnpo.methods import method_for
    from fastnpo.train.setup import load_data

    cache = tmp_path / "cache"
    config = tiny_config(tiny, tmp_path / "run", **{"method.name": "npo", "run.cache_dir": cache})
    train(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    sets, _ = load_data(config, tokenizer, method_for("npo"), 1)
    rows = sorted(sets["forget"], key=lambda item: item["index"])
    data = datasets.Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    )
    lines = []
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    out = add_reference_logprobs(data, model, tokenizer, cache_dir=cache, log=lines.append)
    assert any("cache hit" in line for line in lines), lines
    assert len(list(cache.glob("ref-logprobs-*.safetensors"))) == 1
    assert len(out["ref_logp"]) == len(rows)


# ----------------------------------------------------------------------------- ragged batches


def ragged_forget(tiny, tmp_path):
    """9 forget examples: with a global batch of 4, the last step holds 1, so splitting it in two
    micro-batches (grad_accum or ranks) leaves one of them without any forget example."""
    rows = [json.loads(line) for line in (Path(tiny["data"]) / "full.jsonl").read_text().splitlines()][:9]
    return write_jsonl(tmp_path / "f9.jsonl", rows)


def assert_same_training(split_run, one_batch_run, initial, trained=None):
    """trained: the keys that train (default all); the others must not move at all."""
    split, single = final_weights(split_run), final_weights(one_batch_run)
    assert split.keys() == single.keys()
    for key in single:
        if trained is not None and key not in trained:
            assert torch.equal(split[key], initial[key]) and torch.equal(single[key], initial[key]), key
            continue
        moved = (single[key] - initial[key]).abs().max().item()
        assert moved > 1e-4, key
        # Reduction order differs between the runs; see test_two_processes_match_one_process.
        torch.testing.assert_close(split[key], single[key], atol=0.01 * moved, rtol=0, msg=key)


def ragged_overrides(tiny, tmp_path, method, batch, **extra):
    common = {
        **method_overrides(method, tiny),
        "data.forget": ragged_forget(tiny, tmp_path),
        "data.batch_size": batch,
        "data.retain_batch_size": batch,
        "optim.max_steps": 0,
        "optim.epochs": 1,
        "run.cache_dir": tmp_path / "cache",
    }
    return {**common, **extra}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_accum_over_an_empty_micro_batch_matches_one_big_batch(tiny, tmp_path, method):
    # Issue: a micro-batch without forget examples was skipped, retain half included.
    train(tiny_config(tiny, tmp_path / "big", **ragged_overrides(tiny, tmp_path, method, 4)))
    accum = ragged_overrides(tiny, tmp_path, method, 2, **{"optim.grad_accum": 2})
    train(tiny_config(tiny, tmp_path / "accum", **accum))
    steps = [json.loads(line)["step"] for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # 4 + 4 + 1 forget examples
    big = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    accumulated = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    for record, reference in zip(accumulated, big, strict=True):
        for key in ("loss", "mean_forget_logp", *(k for k in ("retain_nll", "kl") if k in reference)):
            assert record[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), (record["step"], key)
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    trained = RMU_TRAINED if method == "rmu" else None
    assert_same_training(tmp_path / "accum", tmp_path / "big", initial, trained)


def two_rank_job(root: Path, runs: list[list[str]], *, timeout: float) -> subprocess.CompletedProcess:
    """Training runs (each a list of tiny_cpu.yaml overrides) one after the other in ONE torchrun
    job of two gloo ranks (tests/train/two_rank_runs.py): torchrun's start-up is paid once."""
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    (root / "runs.json").write_text(json.dumps([{"config": config, "overrides": values} for values in runs]))
    driver = Path(__file__).parent / "two_rank_runs.py"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(driver), str(root / "runs.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def two_rank_runs(tiny, tmp_path_factory):
    """Every method's ragged run on two ranks, in one torchrun job (tests/train/two_rank_runs.py:
    the start-up is paid once, ~4 s a method after it)."""
    root = tmp_path_factory.mktemp("two_ranks")
    runs = []
    for method in sorted(METHODS):
        (root / method).mkdir()
        values = tiny_overrides(tiny, root / method / "two", **ragged_overrides(tiny, root / method, method, 2))
        runs.append(values)
    return root, two_rank_job(root, runs, timeout=900)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_with_an_empty_share_finish_and_match_one_process(tiny, two_rank_runs, method):
    # Issue: the rank without forget examples skipped its forward while the other entered the
    # FSDP collectives: a hang until gloo's 30-minute timeout. And every method must give the
    # same parameters on two ranks as on one process at the same global batch.
    root, job = two_rank_runs
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    folder = root / method
    assert json.loads((folder / "two" / "run_info.json").read_text())["fsdp"] is True
    train(tiny_config(tiny, folder / "one", **ragged_overrides(tiny, folder, method, 4)))
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    trained = RMU_TRAINED if method == "rmu" else None
    assert_same_training(folder / "two", folder / "one", initial, trained)


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize(
    "override", ["optim.lr=inf", "optim.max_grad_norm=nan", "optim.betas=[0.9,inf]", "method.beta=inf"]
)
def test_config_rejects_non_finite_numbers(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0].replace('.', '[.]')}: must be a finite number"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", [override])


def test_divergence_stops_the_run_keeps_the_checkpoint_and_exports_nothing(tiny, tmp_path, monkeypatch):
    from fastnpo.train.step import TrainingDiverged

    # The gradient norm turns non-finite at step 5, after the checkpoints of steps 2 and 4. (Divergence
    # left to a huge learning rate came at step 1 or 2 depending on the library versions.)
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_diverge(parameters, limit, *args, **kwargs):
        calls.append(limit)
        norm = real_clip(parameters, limit, *args, **kwargs)
        return norm * float("nan") if len(calls) >= 5 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_diverge)
    out = tmp_path / "run"
    config = tiny_config(tiny, out, **{"optim.max_steps": 30, "run.checkpoint_every": 2})
    with pytest.raises(TrainingDiverged, match=r"step 5: the gradient norm is nan"):
        train(config)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept[-1] == "step_4", f"the last good checkpoint is kept: {kept}"
    assert not (out / "final").exists()

    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}")

    records = [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["grad_norm"]) for r in records)


# ----------------------------------------------------------------------------- optimizer in the backward

IN_BACKWARD = {"optim.in_backward": "true", "optim.max_grad_norm": 0}


def metric_records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("optimizer", "norm_rel"),
    [
        ({"optim.name": "adamw"}, 1e-5),
        # clip_grad_norm_ returns a bf16 norm of bf16 gradients; the hooks sum in fp32
        ({"optim.name": "adamw_kahan", "model.dtype": "bfloat16", "optim.lr": 3e-3}, 2**-7),
    ],
    ids=["adamw-fp32", "adamw_kahan-bf16"],
)
def test_in_backward_steps_match_the_step_after_the_backward(tiny, tmp_path, optimizer, norm_rel):
    # The same optimizer, the same updates, one parameter at a time inside the backward. The tiny
    # model ties its embeddings, so the lm_head's gradient waits for the embedding's there.
    common = {"method.name": "npo_rt", "optim.max_steps": 3, "optim.max_grad_norm": 0, **optimizer}
    train(tiny_config(tiny, tmp_path / "after", **common))
    train(tiny_config(tiny, tmp_path / "inside", **{**common, **IN_BACKWARD}))
    after, inside = final_weights(tmp_path / "after"), final_weights(tmp_path / "inside")
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    assert after.keys() == inside.keys()
    for key in after:
        assert not torch.equal(after[key], initial[key].to(after[key].dtype)), key
        torch.testing.assert_close(inside[key], after[key], atol=0, rtol=0, msg=key)
    for a, b in zip(metric_records(tmp_path / "after"), metric_records(tmp_path / "inside"), strict=True):
        assert b["loss"] == a["loss"]
        # the norm is summed per parameter instead of over torch's per-tensor norms
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=norm_rel)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"optim.grad_accum": 2}, r"optim\.in_backward: .*optim\.grad_accum=1.*got 'optim\.grad_accum=2'"),
        ({"optim.max_grad_norm": 1.0}, r"optim\.in_backward: clipping .*got 'optim\.max_grad_norm=1\.0'"),
    ],
)
def test_in_backward_refuses_accumulation_and_clipping(tiny, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tiny, tmp_path / "run", **{**IN_BACKWARD, **extra})
    assert not (tmp_path / "run").exists()


def test_in_backward_divergence_stops_the_run_and_exports_nothing(tiny, tmp_path):
    from fastnpo.train.step import TrainingDiverged

    out = tmp_path / "run"
    config = tiny_config(tiny, out, **IN_BACKWARD, **{"optim.lr": 1e4, "optim.max_steps": 30})
    with pytest.raises(TrainingDiverged, match=r"step \d+: the gradient norm is (nan|inf).*already updated"):
        train(config)
    assert not (out / "final").exists()
    assert all(math.isfinite(r["grad_norm"]) for r in metric_records(out))


# ----------------------------------------------------------------------------- optimizer state offloaded to CPU memory

OFFLOAD = {"optim.offload": "true"}


@pytest.fixture
def offload_on_cpu(monkeypatch):
    """optim.offload refuses any device but CUDA (there is nothing to offload from); on CPU the
    same code runs (FSDP2 over a group of one, CPUOffloadPolicy, the fused CPU step) when allowed."""
    import fastnpo.train.setup as setup

    monkeypatch.setattr(setup, "OFFLOAD_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize(
    "optimizer",
    [{"optim.name": "adamw", "optim.grad_accum": 2}, {"optim.name": "adamw_kahan", "model.dtype": "bfloat16"}],
    ids=["adamw-fp32-accumulating", "adamw_kahan-bf16"],
)
def test_offload_matches_the_run_without_it(tiny, tmp_path, offload_on_cpu, optimizer):
    # With clipping (the default max_grad_norm=1: its norm is a collective over CPU DTensors) and,
    # for AdamW, gradient accumulation; torch's fused CPU AdamW against its default step.
    common = {"method.name": "npo_rt", "optim.max_steps": 3, "optim.lr": 3e-3, **optimizer}
    train(tiny_config(tiny, tmp_path / "plain", **common))
    train(tiny_config(tiny, tmp_path / "offload", **common, **OFFLOAD))
    assert json.loads((tmp_path / "offload" / "run_info.json").read_text())["fsdp"] is True
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    plain, offloaded = final_weights(tmp_path / "plain"), final_weights(tmp_path / "offload")
    assert plain.keys() == offloaded.keys()
    for key in plain:
        moved = (plain[key].float() - initial[key].to(plain[key].dtype).float()).abs().max().item()
        assert moved > 1e-4, key
        gap = (offloaded[key].float() - plain[key].float()).abs().max().item()
        # fp32: the fused step rounds differently (measured <= 1e-6 of the distance moved); bf16:
        # the same arithmetic, so the same weights
        assert gap <= (1e-4 * moved if plain[key].dtype == torch.float32 else 0), (key, gap, moved)
    for a, b in zip(metric_records(tmp_path / "plain"), metric_records(tmp_path / "offload"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


@pytest.mark.gpu
def test_offload_on_cuda_matches_the_run_without_it(tiny, tmp_path):
    # The GPU path: pinned shards, nccl beside gloo, clipping's norm over CPU-resident gradients.
    common = {"method.name": "npo_rt", "optim.max_steps": 3, "optim.lr": 3e-3, "run.device": "cuda"}
    train(tiny_config(tiny, tmp_path / "plain", **common))
    train(tiny_config(tiny, tmp_path / "offload", **common, **OFFLOAD))
    plain, offloaded = final_weights(tmp_path / "plain"), final_weights(tmp_path / "offload")
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    for key in plain:
        moved = (plain[key] - initial[key]).abs().max().item()
        assert moved > 1e-4, key
        # GPU matmuls and reductions run in another order in the sharded run
        torch.testing.assert_close(offloaded[key], plain[key], atol=0.01 * moved, rtol=0, msg=key)


def test_offload_state_lives_in_cpu_memory_as_dtensor_shards(tiny, tmp_path, offload_on_cpu):
    from torch.distributed.tensor import DTensor

    from fastnpo import distributed
    from fastnpo.train.setup import load_model, load_tokenizer
    from fastnpo.train.trainer import Trainer

    config = tiny_config(tiny, tmp_path / "run", **OFFLOAD)
    info = distributed.setup("cpu", offload=True)
    try:
        trainer = Trainer.around_model(config, info, load_model(config, info.device), load_tokenizer(config))
        trainee, optimizer = trainer.model, trainer.optimizer
        assert trainee.sharded and optimizer.param_groups[0]["fused"] is True
        assert all(isinstance(p, DTensor) and p.to_local().device.type == "cpu" for p in trainee.parameters)
    finally:
        distributed.teardown()


def test_around_model_refuses_a_method_that_needs_the_frozen_reference(tiny, tmp_path):
    from fastnpo import distributed
    from fastnpo.train.setup import load_model, load_tokenizer
    from fastnpo.train.trainer import Trainer

    config = tiny_config(tiny, tmp_path / "run", **{"method.name": "npo_kl"})
    info = distributed.setup("cpu")
    try:
        model = load_model(config, info.device)
        with pytest.raises(ConfigError, match=r"method\.name: npo_kl needs a frozen reference.*Trainer\.build"):
            Trainer.around_model(config, info, model, load_tokenizer(config))
    finally:
        distributed.teardown()

@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (IN_BACKWARD, r"optim\.offload: .*set optim\.in_backward=false, got 'optim\.in_backward=true'"),
        ({"optim.name": "adamw_8bit"}, r"optim\.offload: adamw_8bit.*got 'optim\.name=adamw_8bit'"),
        ({"distributed.fsdp": "off"}, r"optim\.offload: .*FSDP2's CPUOffloadPolicy.*got 'distributed\.fsdp=off'"),
    ],
)
def test_offload_refuses_combinations_that_cannot_work(tiny, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tiny, tmp_path / "run", **OFFLOAD, **extra)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("written", "meant"), [("off", "off"), ("on", "on"), ("false", "off"), ("auto", "auto")])
def test_yaml_on_and_off_are_fsdp_modes_not_booleans(written, meant):
    # YAML 1.1 reads on / off as booleans: `fsdp: off` was refused as "got 'False'"
    from fastnpo.config import load_structured

    assert load_structured(Config, None, [f"distributed.fsdp={written}"]).distributed.fsdp == meant


def test_offload_more_than_the_host_has_is_refused_before_any_work(tiny, tmp_path, offload_on_cpu, monkeypatch, capsys):
    import fastnpo.train.setup as setup

    monkeypatch.setattr(setup, "available_host_gib", lambda: 1e-6)
    match = r"optim\.offload: .*need about [0-9.]+ GiB of host memory on this node \(fastnpo plan\), 0\.0 GiB is"
    with pytest.raises(ConfigError, match=match):
        train(tiny_config(tiny, tmp_path / "run", **OFFLOAD))
    assert not (tmp_path / "run").exists()
    assert "optim.offload: planned host memory" in capsys.readouterr().out


def test_offload_without_a_gpu_is_refused_before_any_work(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.offload: .*needs a CUDA GPU; this run's device is cpu"):
        train(tiny_config(tiny, tmp_path / "run", **OFFLOAD))
    assert not (tmp_path / "run").exists()


# Optimizer modes on two FSDP2 ranks (DTensor shards): in-backward steps (FSDP2 runs the
# post-accumulate-grad hooks on the sharded parameters after the reduce-scatter), KahanAdamW's
# update of each rank's local shard, and the offload policy (two_rank_runs.py allows it on CPU).
SHARDED_OPTIMIZERS = {
    "in_backward": {**IN_BACKWARD},
    "kahan_bf16": {"optim.name": "adamw_kahan", "model.dtype": "bfloat16", "optim.lr": 3e-3},
    "kahan_bf16_in_backward": {
        "optim.name": "adamw_kahan",
        "model.dtype": "bfloat16",
        "optim.lr": 3e-3,
        **IN_BACKWARD,
    },
    # CPUOffloadPolicy on two ranks: gloo reduce-scatters, shards and the fused step in CPU memory
    "offload": {**OFFLOAD},
}


@pytest.fixture(scope="module")
def sharded_optimizer_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_optimizers")
    runs = []
    for name, extra in SHARDED_OPTIMIZERS.items():
        common = {"optim.max_steps": 3, "method.name": "npo_rt", "run.cache_dir": root / name / "cache", **extra}
        runs.append(tiny_overrides(tiny, root / name / "two", **common))
    return root, two_rank_job(root, runs, timeout=600)


@pytest.mark.parametrize("name", list(SHARDED_OPTIMIZERS))
def test_two_ranks_match_one_process_with_each_optimizer_mode(tiny, sharded_optimizer_runs, name, offload_on_cpu):
    root, job = sharded_optimizer_runs
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    folder = root / name
    assert json.loads((folder / "two" / "run_info.json").read_text())["fsdp"] is True
    common = {"optim.max_steps": 3, "method.name": "npo_rt", "run.cache_dir": folder / "cache"}
    one = {**common, **SHARDED_OPTIMIZERS[name], "data.batch_size": 8, "data.retain_batch_size": 8}
    train(tiny_config(tiny, folder / "one", **one))
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    if "kahan" not in name:
        assert_same_training(folder / "two", folder / "one", initial)
    else:
        # bf16: the ranks reduce bf16 gradients in another order, Adam divides each entry by its
        # own magnitude, and a stored weight moves in bf16 gaps, so single entries differ by up
        # to a gap (measured: 11-26% of entries, by <= 4.6e-3 where weights moved <= 7.7e-3); on
        # average the runs agree to 0.6% of the distance moved.
        split, single = final_weights(folder / "two"), final_weights(folder / "one")
        assert split.keys() == single.keys()
        for key in single:
            moved = (single[key].float() - initial[key].to(torch.bfloat16).float()).abs().mean()
            assert moved > 0, key
            gap = (split[key].float() - single[key].float()).abs().mean()
            assert gap <= 0.02 * moved, (key, float(gap / moved))
    tolerance = 2**-7 if "kahan" in name else 1e-4  # clip_grad_norm_'s norm is bf16 with bf16 gradients
    for a, b in zip(metric_records(folder / "one"), metric_records(folder / "two"), strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=tolerance)


# ----------------------------------------------------------------------------- run.example_weights (U2A)


def test_example_weights_of_one_change_nothing_and_scale_the_forget_term(tiny, tmp_path):
    rows = len((Path(tiny["data"]) / "full.jsonl").read_text().splitlines())
    common = {"method.name": "npo", "optim.max_steps": 2, "run.cache_dir": tmp_path / "cache"}
    ones, halves = tmp_path / "ones.json", tmp_path / "halves.json"
    ones.write_text(json.dumps([1.0] * rows))
    halves.write_text(json.dumps([0.5] * rows))
    train(tiny_config(tiny, tmp_path / "plain", **common))
    train(tiny_config(tiny, tmp_path / "ones", **common, **{"run.example_weights": ones}))
    train(tiny_config(tiny, tmp_path / "halves", **common, **{"run.example_weights": halves}))
    plain, weighted = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ones")
    assert all(torch.equal(plain[key], weighted[key]) for key in plain)
    first = {name: metric_records(tmp_path / name)[0] for name in ("plain", "halves")}
    assert first["halves"]["loss"] == pytest.approx(0.5 * first["plain"]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1.0, 1.0]", r"run\.example_weights .*: 2 weights, but the forget set's examples reach row \d+"),
        ("[1.0, -1.0]", r"run\.example_weights must be a JSON list of finite numbers >= 0"),
        ("{not json", r"run\.example_weights .*: not a JSON list of numbers"),
    ],
)
def test_bad_example_weights_are_refused_before_any_work(tiny, tmp_path, content, match):
    path = tmp_path / "weights.json"
    path.write_text(content)
    config = tiny_config(tiny, tmp_path / "run", **{"method.name": "npo", "run.example_weights": path})
    with pytest.raises(ConfigError, match=match):
        train(config)
    assert not (tmp_path / "run").exists()
