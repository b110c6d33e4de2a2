"""ROUGE-L F1 and stop-word truncation against plain computations of open-unlearning's definitions."""

import re

import pytest
from rouge_score import rouge_scorer

from fastnpo.muse.metrics import KNOWMEM_STOPWORDS, rouge_l_f1, truncate_at_stopwords


def _tokens(text):
    # rouge_score's default tokenisation: lower case, anything but [a-z0-9] separates tokens.
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _f1(prediction, reference):
    """ROUGE-L F1 = 2PR / (P + R), P = LCS / |prediction|, R = LCS / |reference| (0 when LCS = 0)."""
    p, r = _tokens(prediction), _tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# Words of at most three letters and numbers: the Porter stemmer leaves them alone, so the plain
# computation above needs no stemmer.
CASES = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("The CAT, sat... on a mat!", "a cat sat on the mat"),
    ("mat the on sat cat", "the cat sat on the mat"),
    ("42 of 99 men", "the 42 men"),
    ("", "the cat"),
    ("dog", "the cat"),
    ("a b c d e f", "f e d c b a"),
]


@pytest.mark.parametrize(("prediction", "reference"), CASES)
def test_rouge_l_f1_is_the_lcs_f_measure(prediction, reference):
    (ours,) = rouge_l_f1([prediction], [reference])
    assert ours == pytest.approx(_f1(prediction, reference), abs=1e-12)


def test_rouge_l_f1_matches_open_unlearnings_scorer_call_with_stemming():
    # eval_text_similarity: RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(gt, gen)["rougeL"].fmeasure
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    predictions = ["He was running to the stations", "Galra Quilmere", "founded in 1911 by the brothers"]
    references = ["he runs to the station", "Galra Kesovic", "The firm was founded in 1911 by Quilmere."]
    expected = [scorer.score(g, p)["rougeL"].fmeasure for p, g in zip(predictions, references, strict=True)]
    assert rouge_l_f1(predictions, references) == pytest.approx(expected, abs=1e-12)
    assert rouge_l_f1(["running"], ["runs"]) == [1.0]  # the stemmer is on
    # F1, not recall: an answer padded with extra words loses precision.
    assert rouge_l_f1(["Galra Quilmere and many other words"], ["Galra Quilmere"])[0] == pytest.approx(
        2 * (2 / 6) / (1 + 2 / 6)
    )


def _reference_truncation(text, stopwords):
    """open-unlearning's loop: for each word in order, keep what precedes its first occurrence; then strip."""
    for word in stopwords:
        if word and word in text:
            text = text.split(word)[0]
    return text.strip()


@pytest.mark.parametrize(
    "text",
    [
        "Galra Quilmere\n\nQuestion: Who owns it?",
        " 21 dollars\nQuestion: next",
        "1911 Question: again",
        "\n\nParis",  # a leading stop word leaves nothing: cut first, strip after
        "  no stop word at all  ",
        "Answer with\nQuestions inside",
    ],
)
def test_truncation_follows_open_unlearning(text):
    words = ("<eos>", *KNOWMEM_STOPWORDS)
    assert truncate_at_stopwords(text, words) == _reference_truncation(text, words)


def test_truncation_examples_and_order():
    assert truncate_at_stopwords("Galra Quilmere\n\nQuestion: x", KNOWMEM_STOPWORDS) == "Galra Quilmere"
    assert truncate_at_stopwords("\n\nParis", KNOWMEM_STOPWORDS) == ""
    assert truncate_at_stopwords("x\nQuestion: y", KNOWMEM_STOPWORDS) == "x"
    # Words are applied in turn, not at the earliest match of any: "b\n" no longer occurs once
    # "\n\n" has cut the text ("a" would be the earliest-match answer).
    assert truncate_at_stopwords("ab\n\nc", ("\n\n", "b\n")) == "ab"
    assert truncate_at_stopwords("ab\n\nc", ("b\n", "\n\n")) == "a"
    assert truncate_at_stopwords("a b", ("",)) == "a b"  # an empty stop word (no decoded eos) is skipped


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="predictions must be a sequence"):
        rouge_l_f1("abc", ["abc"])
    with pytest.raises(ValueError, match=r"references\[1\] must be a str"):
        rouge_l_f1(["a", "b"], ["a", None])
    with pytest.raises(ValueError, match="must match"):
        rouge_l_f1(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="must not be empty"):
        rouge_l_f1([], [])
    with pytest.raises(ValueError, match="text must be a str"):
        truncate_at_stopwords(None, KNOWMEM_STOPWORDS)
    with pytest.raises(ValueError, match="stopwords must be a sequence"):
        truncate_at_stopwords("x", "\n\n")
