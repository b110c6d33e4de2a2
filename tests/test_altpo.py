"""AltPO: its loss against a plain-PyTorch reimplementation of open-unlearning's AltPO (its DPO
trainer, src/trainer/unlearn/dpo.py, over alternate answers), the alternate set, training through
the trainer, and the generation of alternates by the model's own greedy answers."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_alternates, tiny_config

from fastnpo import sequence_logprobs
from fastnpo.data import DataConfig, build_unlearning_data, make_alternates
from fastnpo.methods import METHODS, MethodConfig, loss_terms
from fastnpo.train import train


def altpo_config(tiny, out, **extra):
    return tiny_config(tiny, out, **{"method.name": "altpo", "data.alternate": tiny_alternates(tiny), **extra})


def padded(items, pad):
    from fastnpo.data import collate

    batch = collate(items, pad)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


# ----------------------------------------------------------------------------- open-unlearning's AltPO


def batch_nll(model, inputs):
    """open-unlearning's compute_batch_nll: the summed answer-token NLL of each row (full logits)."""
    logits = model(**inputs).logits[..., :-1, :]
    return F.cross_entropy(logits.transpose(-1, -2), inputs["labels"][..., 1:], reduction="none").sum(-1)


def open_unlearning_altpo(model, ref_model, items, pad, *, beta, gamma, alpha):
    """gamma x compute_dpo_loss(win = the alternate answers, lose = the forget answers) + alpha x
    the retain set's HF NLL, written from their definition (DPO.yaml: beta 0.1, alpha = gamma = 1)."""
    win, lose = padded(items["alternate"], pad), padded(items["forget"], pad)
    with torch.no_grad():
        win_ref, lose_ref = batch_nll(ref_model, win), batch_nll(ref_model, lose)
    win_log_ratio = -(batch_nll(model, win) - win_ref)
    lose_log_ratio = -(batch_nll(model, lose) - lose_ref)
    forget_loss = -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()
    retain_loss = model(**padded(items["retain"], pad)).loss
    return gamma * forget_loss + alpha * retain_loss


def fastnpo_altpo(model, ref_model, items, pad, config: MethodConfig):
    """fastnpo's AltPO terms from per-sequence log-probs of the fused op (hidden states, no logits)."""

    def logps(m, set_items):
        batch = padded(set_items, pad)
        hidden = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        values = sequence_logprobs(hidden, m.lm_head.weight, batch["labels"])
        return values, (batch["labels"][:, 1:] != -100).sum(-1)

    out = {name: logps(model, items[name]) for name in ("forget", "alternate", "retain")}
    with torch.no_grad():
        ref = {name: logps(ref_model, items[name])[0] for name in ("forget", "alternate")}
    terms = loss_terms(config, {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}, ref)
    return sum(term.coeff * term.value for term in terms.values()), terms


def test_altpo_loss_and_gradient_equal_open_unlearning(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.methods import method_for
    from fastnpo.train.setup import load_data

    config = altpo_config(
        tiny, "unused", **{"method.beta": 0.5, "method.retain_coeff": 2.0, "method.forget_coeff": 0.7}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    _, batches = load_data(config, tokenizer, method_for("altpo"), 1)
    items = batches.next_items()
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    ref_model = copy.deepcopy(model).eval()
    with torch.no_grad():  # move away from the reference, so that the log-ratios are not 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pad = tokenizer.pad_token_id
    m = config.method
    want = open_unlearning_altpo(model, ref_model, items, pad, beta=m.beta, gamma=m.forget_coeff, alpha=m.retain_coeff)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got, terms = fastnpo_altpo(model, ref_model, items, pad, m)
    got.backward()
    assert set(terms) == {"altpo", "retain_nll"}
    grad_error = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), want_grads, strict=True))
    print(
        f"AltPO vs open-unlearning: |loss diff| {abs(got.item() - want.item()):.3e}, max |grad diff| {grad_error:.3e}"
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_altpo_trains_through_the_trainer(tiny, tmp_path):
    result = train(altpo_config(tiny, tmp_path / "run", **{"run.cache_dir": tmp_path / "cache"}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["altpo"], r["retain_nll"], r["loss"]])).all() for r in records)
    assert records[0]["altpo"] == pytest.approx(2 / 0.1 * torch.log(torch.tensor(2.0)).item(), rel=1e-4)  # ratio 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["reference_cache_hit"] is False and result["final"] is not None
    assert METHODS["altpo"].sets == ("forget", "alternate", "retain")
    assert METHODS["altpo"].ref_sets == ("forget", "alternate")


# ----------------------------------------------------------------------------- the alternate set


def test_alternates_from_a_table_or_the_forget_sets_own_column(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    folder, alternates = Path(tiny["data"]), tiny_alternates(tiny)
    table = [json.loads(line) for line in alternates.read_text().splitlines()]
    config = DataConfig(forget=str(folder), forget_split="forget10", alternate=str(alternates))
    data = build_unlearning_data(config, tokenizer, alternate=True)
    assert data.alternate.indices == data.forget.indices
    first = data.batches.items(0, 0)
    assert [it["index"] for it in first["alternate"]] == [it["index"] for it in first["forget"]]
    # The same alternates as a column of the forget file itself (data.alternate empty).
    rows = [json.loads(line) for line in (folder / "forget10.jsonl").read_text().splitlines()]
    by_question = {r["question"]: r["alternate"] for r in table}
    own = tmp_path / "forget.jsonl"
    own.write_text("".join(json.dumps({**r, "alternate": by_question[r["question"]]}) + "\n" for r in rows))
    same = build_unlearning_data(DataConfig(forget=str(own)), tokenizer, alternate=True)
    assert [it["input_ids"] for it in same.alternate.items] == [it["input_ids"] for it in data.alternate.items]
    assert [it["input_ids"] for it in same.alternate.items] != [it["input_ids"] for it in data.forget.items]
    # A forget question without an alternate answer is refused, naming data.alternate.
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in table if r["question"] != rows[0]["question"]))
    with pytest.raises(ValueError, match=r"data\.alternate .*no non-empty alternate answer for 1 of"):
        build_unlearning_data(DataConfig(forget=str(own), alternate=str(partial)), tokenizer, alternate=True)
    with pytest.raises(ValueError, match="no 'alternate' column"):
        build_unlearning_data(DataConfig(forget=str(folder), forget_split="forget10"), tokenizer, alternate=True)


def test_make_alternates_writes_the_models_greedy_answers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.modeling import greedy_generate

    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    config = DataConfig(forget=str(tiny["data"]), forget_split="forget10")

    def generate(prompts):
        return greedy_generate(model, tokenizer, prompts, max_new_tokens=6)

    out = make_alternates(config, tokenizer, generate, tmp_path / "alt" / "forget10.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    forget = [json.loads(line) for line in (Path(tiny["data"]) / "forget10.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == [(f["question"], f["answer"]) for f in forget]
    assert all(set(r) == {"question", "answer", "alternate"} and isinstance(r["alternate"], str) for r in rows)
    assert any(r["alternate"] for r in rows)
    again = make_alternates(config, tokenizer, generate, tmp_path / "again.jsonl")
    assert again.read_text() == out.read_text()  # greedy: the same answers each time
    if all(r["alternate"] for r in rows):  # the directory layout (<forget_split>.jsonl) reads back
        data = build_unlearning_data(
            DataConfig(**{**vars(config), "alternate": str(tmp_path / "alt")}), tokenizer, alternate=True
        )
        assert len(data.alternate) == len(forget)


def test_the_make_alternates_command_writes_one_alternate_per_forget_question(tiny, tmp_path):
    from fastnpo.cli import main

    out = tmp_path / "alternates.jsonl"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    overrides = [f"model.name_or_path={tiny['base']}", f"data.forget={tiny['data']}", "run.progress=false"]
    argv = ["make-alternates", "--config", str(config), "--out", str(out), "--max-new-tokens", "4", *overrides]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    forget = [json.loads(line) for line in (Path(tiny["data"]) / "forget10.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == [(f["question"], f["answer"]) for f in forget]
    assert all(isinstance(r["alternate"], str) for r in rows)
    before = out.read_bytes()
    assert main(argv) == 2  # an existing file is refused (one line, exit 2) and kept
    assert out.read_bytes() == before


def test_the_make_alternates_command_refuses_a_bad_token_budget(tiny, tmp_path):
    from fastnpo.cli import main

    out = tmp_path / "alternates.jsonl"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    argv = ["make-alternates", "--config", str(config), "--out", str(out), "--max-new-tokens", "0"]
    assert main([*argv, f"model.name_or_path={tiny['base']}", f"data.forget={tiny['data']}"]) == 2
    assert not out.exists()
