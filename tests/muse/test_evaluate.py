"""A tiny end-to-end MUSE evaluation, checked against plain computations: one prompt at a time, the
full max_new_tokens, full logits, open-unlearning's formulas written out here."""

import math
import warnings

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from fastnpo.muse.evaluate import MuseEvalConfig, evaluate_muse, summary
from fastnpo.muse.minimuse import TEMPLATE, generate_minimuse, knowmem_prompt, tokenizer_texts, write_minimuse
from fastnpo.tiny import TinyModelSpec, build_tiny_model, build_tokenizer

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

SIZES = {"num_forget": 3, "num_retain": 2, "num_holdout": 3, "num_general": 4, "num_icl": 1}
STOP = ("\n\n", "\nQuestion", "Question:")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_minimuse(tmp_path_factory.mktemp("muse") / "data", seed=5, **SIZES)
    data = generate_minimuse(5, **SIZES)
    tokenizer = build_tokenizer(tokenizer_texts(data), vocab_size=400, extra_tokens=("Question: ", "Answer: "))
    spec = TinyModelSpec(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512
    )
    lm = build_tiny_model(tokenizer, spec, seed=0)
    # A few steps on the training documents, so that generations overlap their gold text partly
    # (a random model's ROUGE would be 0 everywhere, and a comparison of zeros proves little).
    texts = [r["text"] for r in data["raw"]["forget"]]  # the forget articles and quizzes, as one batch
    rows = [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"], tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    mask = (labels != -100).long()
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster on a busy machine
    try:
        for _ in range(100):
            loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    lm.eval()
    config = MuseEvalConfig(
        knowmem_max_new_tokens=8,
        verbmem_max_new_tokens=24,
        knowmem_batch_size=3,
        verbmem_batch_size=2,
        batch_size=2,
        progress=False,
    )
    with pytest.warns(UserWarning, match="no retain model"):
        report = evaluate_muse(lm, tokenizer, folder, config)
    return {"folder": folder, "data": data, "tokenizer": tokenizer, "lm": lm, "config": config, "report": report}


def _ids(tokenizer, text):
    return [tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]


@torch.no_grad()
def _greedy(lm, tokenizer, text, n):
    ids = torch.tensor([_ids(tokenizer, text)])
    out = lm.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _cut(text, words):
    for word in words:
        if word and word in text:
            text = text.split(word)[0]
    return text.strip()


def _rouge(generation, gold):
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(gold, generation)["rougeL"].fmeasure


def test_knowmem_rouge_is_the_plain_computation(setup):
    lm, tok, data, report = setup["lm"], setup["tokenizer"], setup["data"], setup["report"]
    for part in ("forget", "retain"):
        icl = data["knowmem"][f"{part}_qa_icl"]
        scores = []
        for qa in data["knowmem"][f"{part}_qa"]:
            prompt = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
            prompt += f"Question: {qa['question']}\nAnswer: "
            assert prompt == knowmem_prompt(icl, qa["question"], TEMPLATE)
            scores.append(_rouge(_cut(_greedy(lm, tok, prompt, 8), ("<eos>", *STOP)), qa["answer"]))
        assert report[f"{part}_knowmem_ROUGE"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert report["forget_knowmem_ROUGE"] > 0.1  # real numbers compared, not zeros
    generations = [e["generation"] for e in report["details"]["forget_knowmem"]]
    assert all(g == g.strip() and "\n\n" not in g and "Question:" not in g for g in generations)


def test_verbmem_rouge_is_the_plain_computation(setup):
    lm, tok, data, report = setup["lm"], setup["tokenizer"], setup["data"], setup["report"]
    scores = [_rouge(_greedy(lm, tok, r["prompt"], 24).strip(), r["gt"]) for r in data["verbmem"]["forget"]]
    assert report["forget_verbmem_ROUGE"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert report["forget_verbmem_ROUGE"] > 0.1  # the check above compared real numbers, not zeros
    assert [e["gold"] for e in report["details"]["forget_verbmem"]] == [r["gt"] for r in data["verbmem"]["forget"]]


@torch.no_grad()
def _token_logprobs_and_argmax(lm, ids, first_target):
    """log p and is-argmax of ids[t] for t >= first_target, from full logits."""
    logits = lm(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(first_target - 1, len(ids) - 1)
    return (
        np.array([logp[t, ids[t + 1]].item() for t in positions]),
        np.array([logits[t].argmax().item() == ids[t + 1] for t in positions]),
    )


def test_privacy_numbers_are_the_plain_computation(setup):
    lm, tok, data, report = setup["lm"], setup["tokenizer"], setup["data"], setup["report"]

    def min_k(text):  # mia_min_k: k = 0.4 of the text's token log-probs, last position dropped
        lp, _ = _token_logprobs_and_argmax(lm, _ids(tok, text), 1)
        lp = np.sort(lp[:-1])
        return -lp[: max(1, int(len(lp) * 0.4))].mean()

    forget = [min_k(r["text"]) for r in data["privleak"]["forget"]]
    holdout = [min_k(r["text"]) for r in data["privleak"]["holdout"]]
    # AUC with forget labelled 0 and holdout 1: P(holdout score > forget score) + ties / 2
    auc = np.mean([(h > f) + 0.5 * (h == f) for f in forget for h in holdout])
    assert report["mia_min_k"] == pytest.approx(auc, abs=1e-12)
    assert report["privleak"] == pytest.approx(((1 - auc) - 0.5) / (0.5 + 1e-10) * 100, abs=1e-9)
    assert report["details"]["mia_min_k"]["forget"] == pytest.approx(forget, abs=1e-4)

    strengths, exact = [], []
    for r in data["verbmem"]["forget"]:
        prefix = len(_ids(tok, r["prompt"]))
        _, hits = _token_logprobs_and_argmax(lm, _ids(tok, r["prompt"] + " " + r["gt"]), prefix)
        hits = hits[:-1]
        k = next((k for k in range(len(hits)) if hits[k:].all()), len(hits) - 1)
        strengths.append(1 - k / len(hits))
        exact.append(hits.mean())
    assert report["extraction_strength"] == pytest.approx(np.mean(strengths), abs=1e-12)
    assert report["exact_memorization"] == pytest.approx(np.mean(exact), abs=1e-12)


def test_privleak_against_a_retrained_models_report(setup):
    lm, tok, config = setup["lm"], setup["tokenizer"], setup["config"]
    reference = {"mia_min_k": 0.25}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no retain model" warning now
        report = evaluate_muse(lm, tok, setup["folder"], config, retain_report=reference)
    auc = setup["report"]["mia_min_k"]
    assert report["retain_auc"] == 0.25
    assert report["privleak"] == pytest.approx(((1 - auc) - 0.75) / (0.75 + 1e-10) * 100)
    assert summary(report) == {k: v for k, v in report.items() if k not in ("details", "retain_auc")}
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary(report).values())


def test_without_privacy_only_the_rouge_numbers(setup):
    config = MuseEvalConfig(
        knowmem_max_new_tokens=2, verbmem_max_new_tokens=2, privacy=False, progress=False, max_examples=2
    )
    report = evaluate_muse(setup["lm"], setup["tokenizer"], setup["folder"], config)
    assert set(summary(report)) == {"forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE"}
    assert len(report["details"]["forget_knowmem"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"knowmem_max_new_tokens": 1.5}, "knowmem_max_new_tokens must be a positive int"),
        ({"max_examples": 0}, "max_examples must be"),
        ({"stopwords": "\n\n"}, "stopwords must be a sequence"),
        ({"template": {"user_start": "Q: "}}, "template must be a dict"),
        ({"k": 1.5}, "k must be a fraction"),
        ({"privacy": "yes"}, "privacy must be a bool"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuseEvalConfig(**kwargs)


def test_bad_arguments_are_named(setup):
    lm, tok, folder = setup["lm"], setup["tokenizer"], setup["folder"]
    with pytest.raises(ValueError, match="model must be"):
        evaluate_muse(None, tok, folder)
    with pytest.raises(ValueError, match="tokenizer must be"):
        evaluate_muse(lm, "tok", folder)
    with pytest.raises(ValueError, match="config must be a MuseEvalConfig"):
        evaluate_muse(lm, tok, folder, {"privacy": False})
    with pytest.raises(ValueError, match="retain_report has no 'mia_min_k'"):
        evaluate_muse(lm, tok, folder, retain_report={})
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate_muse(lm, tok, str(folder / "missing"))


def test_evaluate_muse_path_loads_a_saved_model(setup, tmp_path):
    from fastnpo.muse.evaluate import evaluate_muse_path

    setup["lm"].save_pretrained(tmp_path / "model")
    setup["tokenizer"].save_pretrained(tmp_path / "model")
    config = MuseEvalConfig(knowmem_max_new_tokens=8, verbmem_max_new_tokens=24, privacy=False, progress=False)
    report = evaluate_muse_path(tmp_path / "model", setup["folder"], config, device="cpu")
    for key in ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE"):
        assert report[key] == pytest.approx(setup["report"][key], abs=1e-9)
