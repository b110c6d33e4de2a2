import hashlib
import json
import re
import subprocess
import sys

import pytest

from fastnpo.tiny import PROMPT_MARKERS, build_tokenizer
from fastnpo.tofu import minitofu
from fastnpo.tofu.minitofu import (
    SPLITS,
    default_cache_dir,
    ensure_minitofu,
    generate_minitofu,
    load_minitofu_split,
    minitofu_tokenizer,
    write_minitofu,
)

PERTURBED_KEYS = {"question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer"}
PAIRS = (("01", "99"), ("05", "95"), ("10", "90"))
NAME = re.compile(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b")  # question words are never two capitalised words


@pytest.fixture(scope="module")
def data():
    return generate_minitofu(seed=0)


def _key(row):
    return (row["question"], row["answer"])


def _names(rows):
    # Author names in order of first appearance.
    return list(dict.fromkeys(NAME.search(r["question"]).group() for r in rows))


def _words(text):
    return re.findall(r"[\w'-]+", text)


def _diff_span(a, b):
    # The word spans where a and b differ, once their common prefix and suffix are removed.
    a, b = _words(a), _words(b)
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return a[i : len(a) - j], b[i : len(b) - j]


def _contains(words, span):
    return any(words[k : k + len(span)] == span for k in range(len(words) - len(span) + 1))


def test_splits_and_sizes(data):
    assert tuple(data) == SPLITS
    assert len(data["full"]) == 400 and len(_names(data["full"])) == 100
    assert len({n.split()[1] for n in _names(data["full"])}) == 100  # one surname per author
    assert len(_names(generate_minitofu(num_authors=300)["full"])) == 300
    assert [len(data[f"forget{p}"]) for p, _ in PAIRS] == [4, 20, 40]
    assert len(data["retain_perturbed"]) == 40
    assert [len(data[f"holdout{p}"]) for p, _ in PAIRS] == [4, 20, 40]  # as large as the forget sets
    assert len(data["real_authors_perturbed"]) == len(data["world_facts_perturbed"]) == 40
    for split in SPLITS:
        keys = PERTURBED_KEYS if split.endswith("_perturbed") else {"question", "answer"}
        assert data[split] and all(set(r) == keys for r in data[split]), split
        for row in data[split]:
            texts = [row["question"], row["answer"], *row.get("perturbed_answer", [])]
            assert all(isinstance(t, str) and t.isascii() for t in texts)


def test_determinism():
    a = generate_minitofu(seed=3)
    assert json.dumps(a) == json.dumps(generate_minitofu(seed=3))
    other = generate_minitofu(seed=4)
    assert other["full"] != a["full"] and other["forget10_perturbed"] != a["forget10_perturbed"]
    # Separate RNG streams: fewer QA per author keeps the same authors and the same facts.
    few, many = generate_minitofu(seed=3, qa_per_author=2), generate_minitofu(seed=3, qa_per_author=10)
    assert _names(few["full"]) == _names(a["full"]) == _names(many["full"])
    assert {_key(r) for r in a["full"]} <= {_key(r) for r in many["full"]}
    assert {_key(r) for r in few["full"]} <= {_key(r) for r in many["full"]}


@pytest.mark.torchrun
def test_determinism_across_processes(data):
    # String seeds go through SHA-512, not the salted hash(): a new interpreter must agree.
    # Load the module file alone: the package __init__ pulls in torch, which only costs start-up time here.
    code = (
        "import importlib.util as u, json, sys; s = u.spec_from_file_location('m', sys.argv[1]); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(json.dumps(m.generate_minitofu()))"
    )
    args = [sys.executable, "-c", code, minitofu.__file__]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == data


def test_split_integrity(data):
    full = [_key(r) for r in data["full"]]
    assert len(set(full)) == len(full), "duplicate QA pairs in full"
    prev = set()
    for forget, retain in PAIRS:
        f, r = [_key(x) for x in data[f"forget{forget}"]], [_key(x) for x in data[f"retain{retain}"]]
        assert not set(f) & set(r)
        assert r + f == full  # forget set = tail of full, retain = the rest, both in order
        assert prev <= set(f)  # forget01 within forget05 within forget10
        prev = set(f)
        assert [_key(x) for x in data[f"forget{forget}_perturbed"]] == f
        # Author-aligned: no author has QA on both sides.
        assert not set(_names(data[f"forget{forget}"])) & set(_names(data[f"retain{retain}"]))
    assert _names(data["forget10"]) == _names(data["full"])[-10:]
    assert _names(data["forget01"]) == _names(data["full"])[-1:]
    retain_p = [_key(x) for x in data["retain_perturbed"]]
    assert len(set(retain_p)) == len(retain_p) and set(retain_p) <= set(full)
    assert not set(_names(data["retain_perturbed"])) & set(_names(data["forget10"]))
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        assert not {x["question"] for x in data[split]} & {q for q, _ in full}
    # Holdout: other authors than full's (first name and surname), nested like the forget sets, and
    # asking the same kinds of questions.
    full_surnames = {n.split()[1] for n in _names(data["full"])}
    prev = []
    for p, _ in PAIRS:
        holdout = data[f"holdout{p}"]
        assert len(_names(holdout)) == len(_names(data[f"forget{p}"]))
        assert not {n.split()[1] for n in _names(holdout)} & full_surnames
        assert holdout[len(holdout) - len(prev) :] == prev  # the smaller set is the tail of the larger
        prev = holdout
    kinds = {re.sub(NAME, "X", r["question"]) for r in data["full"]}
    assert {re.sub(NAME, "X", r["question"]) for r in data["holdout10"]} <= kinds


def test_holdout_splits_changed_no_other_split():
    # The splits that existed before the holdout splits, byte for byte (sha256 of their JSON, seed 0).
    data = generate_minitofu(seed=0)
    before = [s for s in SPLITS if not s.startswith("holdout")]
    blob = "".join(json.dumps(data[s], ensure_ascii=False) for s in before)
    assert hashlib.sha256(blob.encode()).hexdigest() == (
        "649b8ee300a1d4e5d18cedeb1195363f873f23325b29b5028b62829a699a4b5d"
    )
    # Holdout authors never reuse a surname of full, even when full takes all 300 (head, tail) pairs.
    big = generate_minitofu(seed=2, num_authors=300, qa_per_author=1)
    assert len(big["holdout10"]) == 30
    assert not {n.split()[1] for n in _names(big["holdout10"])} & {n.split()[1] for n in _names(big["full"])}
    assert generate_minitofu(seed=5)["holdout10"] != data["holdout10"]


def test_forget_sets_round_to_whole_authors():
    small = generate_minitofu(seed=1, num_authors=10, qa_per_author=3)
    # 1%, 5% and 10% of 10 authors all round to one author: never an empty forget set.
    assert [len(small[f"forget{p}"]) for p, _ in PAIRS] == [3, 3, 3]
    data = generate_minitofu(seed=1, num_authors=40, qa_per_author=5)
    assert [len(_names(data[f"forget{p}"])) for p, _ in PAIRS] == [1, 2, 4]
    assert data["forget10"] == data["full"][-20:]


def test_perturbations(data):
    for split in (s for s in SPLITS if s.endswith("_perturbed")):
        for row in data[split]:
            ans, para, perts = row["answer"], row["paraphrased_answer"], row["perturbed_answer"]
            assert 3 <= len(perts) <= 5 and len(set(perts)) == len(perts)
            assert para != ans and set(_words(para)) != set(_words(ans))
            assert row["paraphrased_question"] != row["question"]
            for p in perts:
                assert p not in (ans, para)
                true_span, wrong_span = _diff_span(para, p)
                # Same wording as the paraphrase; what differs is the fact value, which the answer
                # states for the paraphrase and not for the perturbation.
                assert true_span and wrong_span
                assert _contains(_words(ans), true_span), (split, row)
                assert not _contains(_words(ans), wrong_span), (split, row)


def test_texts_short(data):
    for split in SPLITS:
        for row in data[split]:
            answers = [row["answer"], *row.get("perturbed_answer", [])]
            answers += [row["paraphrased_answer"]] if "paraphrased_answer" in row else []
            assert all(4 <= len(a.split()) <= 15 for a in answers), row
            assert len(row["question"].split()) <= 12


def test_write_and_ensure(tmp_path, monkeypatch):
    kw = {"seed": 2, "num_authors": 20, "qa_per_author": 3}
    data = generate_minitofu(**kw)
    out = write_minitofu(tmp_path / "w", **kw)
    assert out == tmp_path / "w"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["num_authors"], manifest["qa_per_author"]) == (2, 20, 3)
    assert manifest["sizes"] == {s: len(data[s]) for s in SPLITS} and len(manifest["sha256"]) == 64
    for split in SPLITS:
        assert load_minitofu_split(out, split) == data[split]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}.jsonl" for s in SPLITS] + ["manifest.json"])

    monkeypatch.setenv("FASTNPO_CACHE", str(tmp_path / "cache"))
    cached = ensure_minitofu(**kw)
    assert cached == tmp_path / "cache" / "minitofu" / "seed2-20x3" == default_cache_dir(2, 20, 3)
    for name in [f"{s}.jsonl" for s in SPLITS] + ["manifest.json"]:
        assert (cached / name).read_bytes() == (out / name).read_bytes()

    def mtimes():
        return {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}

    before = mtimes()
    assert ensure_minitofu(**kw) == cached
    assert mtimes() == before  # reused: nothing rewritten

    (cached / "forget05.jsonl").unlink()
    ensure_minitofu(**kw)
    assert load_minitofu_split(cached, "forget05") == data["forget05"]

    (cached / "full.jsonl").write_text('{"question": "x", "answer": "y"}\n')
    ensure_minitofu(**kw)
    assert load_minitofu_split(cached, "full") == data["full"]

    (cached / "manifest.json").write_text("{not json")
    ensure_minitofu(out_dir=cached, **kw)
    assert json.loads((cached / "manifest.json").read_text()) == manifest

    # Same directory, other arguments: the manifest no longer matches, so everything is rewritten.
    ensure_minitofu(out_dir=cached, seed=5, num_authors=20, qa_per_author=3)
    assert json.loads((cached / "manifest.json").read_text())["seed"] == 5
    assert load_minitofu_split(cached, "full") == generate_minitofu(5, 20, 3)["full"]
    assert not list(cached.glob("*.tmp")) and not list(cached.glob(".*"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTNPO_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir(7, 30, 2) == tmp_path / ".cache" / "fastnpo" / "minitofu" / "seed7-30x2"


def test_tokenizer(data):
    tok = minitofu_tokenizer(data)
    assert len(tok) == 1024
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok.padding_side == "right" and not tok.chat_template
    row = data["full"][7]
    samples = [
        data["full"][0]["question"],
        data["forget10_perturbed"][-1]["perturbed_answer"][0],
        f"[INST] {row['question']} [/INST] {row['answer']}",
        "Unseen text, with odd bytes: \u00e9 \u4e2d\u6587 \t 123!  double  spaces ,.",
    ]
    for text in samples:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.bos_token_id not in ids
        assert tok.decode(ids) == text
    # Prompt and answer tokenised apart concatenate to the joint tokenisation (exact answer masks).
    prompt, answer = f"[INST] {row['question']} [/INST]", f" {row['answer']}"
    assert tok(prompt)["input_ids"] + tok(answer)["input_ids"] == tok(prompt + answer)["input_ids"]
    # Prompt markers are whole tokens that survive skip_special_tokens; surnames are whole tokens,
    # so a tiny model can key every fact on one token per author.
    markers = tok.convert_tokens_to_ids(list(PROMPT_MARKERS))
    assert tok(prompt)["input_ids"][0] == markers[0] and markers[1] in tok(prompt)["input_ids"]
    assert tok.decode(tok(prompt)["input_ids"], skip_special_tokens=True) == prompt
    surnames = {n.split()[1] for n in _names(data["full"])}
    assert sum(len(tok(" " + n)["input_ids"]) == 1 for n in surnames) >= 0.9 * len(surnames)
    # Trained on the data, so it compresses it: short sequences keep the CPU demo fast.
    assert len(tok(row["answer"])["input_ids"]) < len(row["answer"]) / 3
    assert tok.backend_tokenizer.to_str() == minitofu_tokenizer(data).backend_tokenizer.to_str()
    batch = tok(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][-1] == tok.pad_token_id and batch["attention_mask"][1][-1] == 0


def test_build_tokenizer():
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 20
    tok = build_tokenizer(iter(texts))
    assert len(tok) <= 512 and tok.bos_token == "<bos>"
    small = build_tokenizer(texts, vocab_size=270, extra_tokens=["<sep>"])
    assert len(small) == 270 and len(small("<sep>")["input_ids"]) == 1
    assert small.decode(small("hello there, <sep> world")["input_ids"]) == "hello there, <sep> world"
    assert build_tokenizer(texts).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_authors": 9}, "num_authors"),
        ({"num_authors": 301}, "num_authors"),
        ({"num_authors": 50.0}, "num_authors"),
        ({"qa_per_author": 0}, "qa_per_author"),
        ({"qa_per_author": 11}, "qa_per_author"),
    ],
)
def test_bad_arguments(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        generate_minitofu(**kwargs)
    with pytest.raises(ValueError, match=name):
        write_minitofu(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=name):
        ensure_minitofu(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written before the check
    with pytest.raises(TypeError, match="seed"):
        generate_minitofu(seed="0")


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=259)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=260, extra_tokens=["[X]"])
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer([])
    with pytest.raises(ValueError, match="split"):
        load_minitofu_split(".", "forget20")


def test_splits_do_not_share_rows():
    data = generate_minitofu(num_authors=10, qa_per_author=2)
    data["forget10"][0]["answer"] = "edited"
    data["forget10_perturbed"][0]["perturbed_answer"].append("edited")
    assert data["full"][-2]["answer"] != "edited"
    assert "edited" not in data["forget05_perturbed"][0]["perturbed_answer"]
