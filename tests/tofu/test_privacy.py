"""Privacy metrics against plain reference implementations written from open-unlearning's definitions
(src/evals/metrics/mia/*.py, memorization.py, privacy.py): full Hugging Face logits per example, its
slicing of the answer tokens, its loops. The metric math on random inputs, then the whole evaluation
on a tiny model briefly trained on part of Mini-TOFU.
"""

import json
import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from fastnpo.tiny import TinyModelSpec
from fastnpo.tofu import attacks, privacy
from fastnpo.tofu.evaluate import EvalConfig, Evaluator, add_privleak, summary
from fastnpo.tofu.minitofu import prepare_tiny

IGNORE = -100

# ----------------------------------------------------------------------------- references


def ref_auc(forget, holdout):
    """roc_auc_score with forget labelled 0, holdout 1: every (forget, holdout) pair counted."""
    wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
    return wins / (len(forget) * len(holdout))


def ref_min_k(token_logprobs, k):
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ref_min_k_plus_plus(vocab_logprobs, token_logprobs, k):
    """From the full [L, V] log-prob matrix, as open-unlearning does."""
    if len(token_logprobs) == 0:
        return 0
    mu = (vocab_logprobs.exp() * vocab_logprobs).sum(-1)
    sigma = (vocab_logprobs.exp() * vocab_logprobs.square()).sum(-1) - mu.square()
    sigma = sigma.clamp(min=1e-6)
    scores = ((token_logprobs - mu) / sigma.sqrt()).numpy()
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def ref_extraction_strength(preds, labels):
    valid_len = len(labels)
    k = 0
    for k in range(valid_len):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 0 if valid_len == 0 else 1 - k / valid_len


def ref_exact_memorization(preds, labels):
    return None if len(labels) == 0 else ((preds == labels).sum() / len(labels)).item()


def ref_privleak(score, ref):
    score, ref = 1 - score, 1 - ref
    return (score - ref) / (ref + 1e-10) * 100


def ref_example(model, tokenizer, item):
    """open-unlearning's per-example statistics of one tokenised QA item, from full logits."""
    ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
    avg_loss = (losses / (labels != IGNORE).sum()).item()
    logp = logits.log_softmax(-1)[0, :-1]
    actual = (labels[0] != IGNORE).nonzero()[:, 0][:-1]  # the eos prediction dropped
    start, end = actual[0].item(), actual[-1].item()
    vocab = logp[start - 1 : end]
    target = vocab.gather(1, ids[0, start : end + 1][:, None])[:, 0]
    answer = labels[0][actual]
    text = tokenizer.decode(labels[0][labels[0] != IGNORE].tolist(), skip_special_tokens=True)
    return {"avg_loss": avg_loss, "vocab": vocab, "target": target, "labels": answer, "text": text}


def ref_gradnorm(model, item, p=2):
    ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
    model.zero_grad()
    logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
    actual = (labels[0] != IGNORE).nonzero()[:, 0][:-1]
    start, end = actual[0].item(), actual[-1].item()
    target = logp[start - 1 : end].gather(1, ids[0, start : end + 1][:, None])[:, 0]
    (-target.mean()).backward()
    norms = [q.grad.detach().norm(p=p) for q in model.parameters() if q.grad is not None]
    model.zero_grad()
    return torch.stack(norms).mean().item()


# ----------------------------------------------------------------------------- metric math


@pytest.mark.parametrize("seed", range(4))
def test_scores_match_references_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    length, vocab = int(rng.integers(1, 12)), 50
    logits = torch.tensor(rng.normal(size=(length, vocab)) * 3)
    vocab_lp = logits.log_softmax(-1)
    labels = torch.tensor(rng.integers(0, vocab, length))
    best = torch.tensor(rng.random(length) < 0.6)
    labels[best] = logits.argmax(-1)[best]
    token_lp = vocab_lp.gather(1, labels[:, None])[:, 0]
    mean = (vocab_lp.exp() * vocab_lp).sum(-1)
    second = (vocab_lp.exp() * vocab_lp.square()).sum(-1)
    hits = (logits.argmax(-1) == labels).numpy()
    # privacy.py takes every answer token and drops the last itself; the references take the rest.
    lp_all = np.append(token_lp.numpy(), -0.5)
    for k in (0.2, 0.4, 1.0):
        assert privacy.min_k_score(lp_all, k) == pytest.approx(ref_min_k(token_lp, k), abs=1e-12)
        got = privacy.min_k_plus_plus_score(lp_all, np.append(mean, -1.0), np.append(second, 2.0), k)
        assert got == pytest.approx(ref_min_k_plus_plus(vocab_lp, token_lp, k), abs=1e-9)
    preds = logits.argmax(-1)
    assert privacy.extraction_strength(np.append(hits, True)) == ref_extraction_strength(preds, labels)
    assert privacy.exact_memorization(np.append(hits, False)) == pytest.approx(ref_exact_memorization(preds, labels))
    assert privacy.loss_score(lp_all) == pytest.approx(-lp_all.mean())


def test_extraction_strength_keeps_open_unlearnings_loop():
    # No suffix matches: the loop ends at k = L-1, so 1/L (not 0); the last token alone also gives 1/L.
    assert privacy.extraction_strength([False, False, False, False, True]) == pytest.approx(1 / 4)
    assert privacy.extraction_strength([False, False, False, True, False]) == pytest.approx(1 / 4)
    assert privacy.extraction_strength([True, True, True, True, False]) == 1.0
    assert privacy.extraction_strength([True, False, True, True, True]) == pytest.approx(1 - 2 / 4)
    assert privacy.extraction_strength([True]) == 0.0  # only the eos position: no token left
    assert privacy.exact_memorization([True]) is None
    assert privacy.min_k_score([-1.0]) == 0.0 and privacy.min_k_plus_plus_score([-1.0], [-1.0], [2.0]) == 0.0
    assert privacy.mean_ignoring_none([None, 0.5, 1.0]) == 0.75 and math.isnan(privacy.mean_ignoring_none([None]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_and_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    forget = rng.integers(0, 6, int(rng.integers(1, 30))).astype(float)  # many ties
    holdout = rng.integers(0, 6, int(rng.integers(1, 30))).astype(float) + rng.random() * 2
    got = privacy.auc(forget, holdout)
    assert got == pytest.approx(ref_auc(forget, holdout), abs=1e-12)
    u = mannwhitneyu(holdout, forget).statistic
    assert got == pytest.approx(u / (len(forget) * len(holdout)), abs=1e-12)
    assert privacy.auc([0.0, 0.1], [1.0, 2.0]) == 1.0 and privacy.auc([1.0], [0.0]) == 0.0


def test_privleak_formula_and_default_retain_auc():
    for score, ref in ((0.9, 0.5), (0.3, 0.62), (0.5, 0.5), (1.0, 0.2)):
        assert privacy.privleak(score, ref) == pytest.approx(ref_privleak(score, ref), abs=1e-9)
    with pytest.warns(UserWarning, match="default retain AUC of 0.5"):
        assert privacy.privleak(0.8) == pytest.approx(ref_privleak(0.8, 0.5))
    with pytest.raises(ValueError, match="retain_auc"):
        privacy.privleak(0.5, 1.5)
    with pytest.raises(ValueError, match="attack_auc"):
        privacy.privleak(float("nan"), 0.5)


def test_zlib_and_reference_and_gradnorm_scores():
    text = "Aldren Talasek was born in the city of Maresh."
    assert privacy.zlib_score([-1.0, -3.0], text) == pytest.approx(2.0 / len(zlib.compress(text.encode())))
    assert privacy.reference_score(2.5, 1.0) == 1.5
    assert privacy.gradnorm_score([1.0, 2.0, 6.0]) == 3.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="k must be"):
        privacy.min_k_score([-1.0, -2.0], k=0)
    with pytest.raises(ValueError, match="logprobs contains NaN"):
        privacy.loss_score([float("nan")])
    with pytest.raises(ValueError, match="logprobs is empty"):
        privacy.loss_score([])
    with pytest.raises(ValueError, match="one length"):
        privacy.min_k_plus_plus_score([-1.0, -2.0], [-1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="both sets"):
        privacy.auc([], [1.0])
    with pytest.raises(ValueError, match="text must be a string"):
        privacy.zlib_score([-1.0], None)


# ----------------------------------------------------------------------------- on a tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model trained a little on forget10 (so forget and holdout differ), and its evaluator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.data import collate

    paths = prepare_tiny(
        tmp_path_factory.mktemp("privacy"),
        num_authors=20,
        qa_per_author=3,
        spec=TinyModelSpec(hidden_size=32, intermediate_size=64),
    )
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    config = EvalConfig(
        data=str(paths["data"]),
        forget_split="forget10",
        generate=False,
        batch_size=4,
        attacks=tuple(a for a in privacy.ATTACKS if a != "mia_reference"),
    )
    evaluator = Evaluator(config, tokenizer)
    items = evaluator.sets["forget"]["true"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        batch = collate(items, tokenizer.pad_token_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return paths, tokenizer, model, evaluator


@pytest.fixture(scope="module")
def evaluated(setup):
    """The fixture model's report (JSON round trip: each test gets its own copy)."""
    return json.dumps(setup[3].evaluate(setup[2]))


def test_every_metric_matches_the_reference_on_a_tiny_model(setup, evaluated):
    _, tokenizer, model, evaluator = setup
    report = json.loads(evaluated)
    section = report["privacy"]
    assert section["holdout_split"] == "holdout10"
    parts = {"forget": evaluator.sets["forget"]["true"], "holdout": evaluator.holdout["items"]}
    expected = {name: {} for name in privacy.ATTACKS}
    es, em = [], []
    for part, items in parts.items():
        refs = [ref_example(model, tokenizer, item) for item in items]
        expected["mia_loss"][part] = [r["avg_loss"] for r in refs]
        expected["mia_zlib"][part] = [r["avg_loss"] / len(zlib.compress(r["text"].encode())) for r in refs]
        expected["mia_min_k"][part] = [ref_min_k(r["target"].numpy(), 0.4) for r in refs]
        expected["mia_min_k_plus_plus"][part] = [ref_min_k_plus_plus(r["vocab"], r["target"], 0.4) for r in refs]
        expected["mia_gradnorm"][part] = [ref_gradnorm(model, item) for item in items]
        if part == "forget":
            preds = [(r["vocab"].argmax(-1), r["labels"]) for r in refs]
            es = [ref_extraction_strength(p, y) for p, y in preds]
            em = [ref_exact_memorization(p, y) for p, y in preds]
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm"):
        for part in parts:
            np.testing.assert_allclose(section[name][part], expected[name][part], rtol=2e-4, atol=1e-5, err_msg=name)
        assert section[name]["auc"] == pytest.approx(ref_auc(expected[name]["forget"], expected[name]["holdout"]))
    assert section["extraction_strength"] == pytest.approx(np.mean(es))
    assert section["exact_memorization"] == pytest.approx(np.mean(em))
    # Trained on the forget set only: it looks like training data, the holdout does not.
    assert section["mia_loss"]["auc"] > 0.9 and section["extraction_strength"] > 0.3
    assert max(em) > 0.5
    # The nine numbers' sets and the privacy section side by side in the summary.
    flat = summary(add_privleak(report, {"privacy": {"mia_min_k": {"auc": 0.5}}}))
    assert flat["privleak"] == pytest.approx(ref_privleak(section["mia_min_k"]["auc"], 0.5))
    assert flat["mia_gradnorm"] == section["mia_gradnorm"]["auc"] and "forget/probability" in flat
    assert all(p.grad is None for p in model.parameters())  # gradnorm left no gradient behind


def test_privleak_against_the_retain_report_and_the_default(evaluated):
    report = json.loads(evaluated)
    auc = report["privacy"]["mia_min_k"]["auc"]
    retain = {"privacy": {"mia_min_k": {"auc": 0.4}}}
    assert add_privleak(report, retain)["privacy"]["privleak"] == pytest.approx(ref_privleak(auc, 0.4))
    with pytest.warns(UserWarning, match="default retain AUC"):
        add_privleak(report, None)
    assert report["privacy"]["privleak"] == pytest.approx(ref_privleak(auc, 0.5))
    assert report["privacy"]["retain_auc"] is None
    # A model against itself as retain model: privleak 0.
    assert add_privleak(report, json.loads(json.dumps(report)))["privacy"]["privleak"] == pytest.approx(0.0)


def test_reference_attack_uses_a_cached_report(setup, evaluated):
    paths, tokenizer, model, _ = setup
    own = json.loads(evaluated)
    config = EvalConfig(data=str(paths["data"]), generate=False, batch_size=4, attacks=("mia_reference",))
    with_reference = Evaluator(config, tokenizer)
    with pytest.raises(ValueError, match="--reference-stats"):
        with_reference.evaluate(model)
    # The reference = the model itself: every score 0, AUC 0.5.
    section = with_reference.privacy(model, reference_report=own)  # the privacy pass alone
    assert section["mia_reference"]["auc"] == 0.5
    assert max(abs(s) for s in section["mia_reference"]["forget"] + section["mia_reference"]["holdout"]) < 1e-9
    # Against per-example losses shifted by +1 on the forget set: scores -1 there, 0 on holdout.
    shifted = json.loads(json.dumps(own))
    shifted["privacy"]["per_example_loss"]["forget"] = [x + 1 for x in shifted["privacy"]["per_example_loss"]["forget"]]
    section = with_reference.privacy(model, reference_report=shifted)
    np.testing.assert_allclose(section["mia_reference"]["forget"], -1.0, atol=1e-9)
    assert section["mia_reference"]["auc"] == 1.0


def test_holdout_missing_unknown_attack_and_privacy_off(setup, tmp_path):
    paths, tokenizer, model, _ = setup
    data = tmp_path / "data"
    data.mkdir()
    for f in paths["data"].glob("*.jsonl"):
        if not f.name.startswith("holdout"):
            (data / f.name).write_text(f.read_text())
    with pytest.warns(UserWarning, match="no holdout set 'holdout10'"):
        evaluator = Evaluator(EvalConfig(data=str(data), generate=False), tokenizer)
    report = evaluator.evaluate(model)
    assert set(report["privacy"]) == {"extraction_strength", "exact_memorization"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "privleak" not in summary(add_privleak(report, None))
    with pytest.raises(FileNotFoundError, match="holdout05"):
        Evaluator(EvalConfig(data=str(data), holdout_split="holdout05"), tokenizer)
    with pytest.raises(ValueError, match="attacks \\['mia_recall'\\] unknown"):
        Evaluator(EvalConfig(data=str(paths["data"]), attacks=("mia_recall",)), tokenizer)
    off = Evaluator(EvalConfig(data=str(data), generate=False, privacy=False), tokenizer)
    assert "privacy" not in off.evaluate(model)


def test_reference_losses_checks_the_report():
    with pytest.raises(ValueError, match="--reference-stats"):
        attacks.reference_losses({"privacy": {}}, "forget", 3)
    with pytest.raises(ValueError, match="has 2 forget examples, this evaluation 3"):
        attacks.reference_losses({"privacy": {"per_example_loss": {"forget": [1.0, 2.0]}}}, "forget", 3)


def test_privacy_leaves_the_tofu_numbers_unchanged(setup, evaluated):
    paths, tokenizer, model, _ = setup
    off = Evaluator(EvalConfig(data=str(paths["data"]), generate=False, batch_size=4, privacy=False), tokenizer)
    with_privacy, without = json.loads(evaluated), off.evaluate(model)
    assert "privacy" in with_privacy and "privacy" not in without
    for name in ("forget", "retain", "real_authors", "world_facts"):
        assert with_privacy[name] == without[name], name
    assert set(summary(with_privacy)) - set(summary(without)) == {
        "extraction_strength",
        "exact_memorization",
        *(a for a in privacy.ATTACKS if a != "mia_reference"),
    }
