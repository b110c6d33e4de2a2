"""Mini-MUSE: reproducible bytes, the hub layout, and facts that the questions really ask about."""

import hashlib
import json

import pytest

from fastnpo.muse.data import COLUMNS, SPLITS, load_muse, raw_texts
from fastnpo.muse.minimuse import TEMPLATE, generate_minimuse, knowmem_prompt, write_minimuse


def _digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a, b, c = (write_minimuse(tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _digests(a) == _digests(b)
    assert len(_digests(a)) == 1 + sum(len(s) for s in SPLITS.values()) + 4  # manifest, hub splits, trainer
    assert (a / "raw" / "forget.jsonl").read_bytes() != (c / "raw" / "forget.jsonl").read_bytes()
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["seed"] == 3
    assert (
        manifest["files"]["verbmem/forget.jsonl"]["sha256"]
        == hashlib.sha256((a / "verbmem/forget.jsonl").read_bytes()).hexdigest()
    )


def test_the_layout_is_the_hubs(tmp_path):
    folder = write_minimuse(tmp_path / "m", seed=0)
    for config, splits in SPLITS.items():
        for split in splits:
            rows = [json.loads(line) for line in (folder / config / f"{split}.jsonl").read_text().splitlines()]
            assert rows and all(set(r) == set(COLUMNS[config]) for r in rows), (config, split)
    data = load_muse(folder)
    assert len(data.forget_qa) == 8 * 4 and len(data.forget_qa_icl) == 3


def test_questions_ask_about_facts_their_split_states_and_no_other_does():
    d = generate_minimuse(0)
    forget_docs = " ".join(r["text"] for r in d["raw"]["forget"])
    others = " ".join(r["text"] for s in ("retain1", "retain2", "holdout") for r in d["raw"][s])
    for qa in d["knowmem"]["forget_qa"]:
        assert f"{qa['question']}\nAnswer: {qa['answer']}" in forget_docs  # stated in a quiz of the split
        assert qa["question"] not in others
    retain2 = " ".join(r["text"] for r in d["raw"]["retain2"])
    assert all(qa["question"] in retain2 for qa in d["knowmem"]["retain_qa"])
    # The facts are the articles' facts: every answer appears in the article's own prose too.
    articles = [r["text"] for r in d["privleak"]["forget"]]
    assert sum(any(qa["answer"].split()[0] in a for a in articles) for qa in d["knowmem"]["forget_qa"]) == 32


def test_splits_relate_as_in_muse():
    d = generate_minimuse(1)
    texts = {s: [r["text"] for r in d["raw"][s]] for s in ("forget", "retain1", "retain2", "holdout")}
    assert all(not set(texts[a]) & set(texts[b]) for a in texts for b in texts if a < b)
    # verbmem: the forget articles, split into prompt + " " + gold continuation
    assert [f"{r['prompt']} {r['gt']}" for r in d["verbmem"]["forget"]] == [r["text"] for r in d["privleak"]["forget"]]
    assert set(r["text"] for r in d["privleak"]["forget"]) <= set(texts["forget"])
    assert set(r["text"] for r in d["privleak"]["holdout"]) <= set(texts["holdout"])
    target = [r["answer"] for r in d["trainer"]["target"]]
    retrain = [r["answer"] for r in d["trainer"]["retrain"]]
    assert set(texts["forget"]) <= set(target) and not set(texts["forget"]) & set(retrain)
    assert not set(texts["holdout"]) & set(target)  # privleak's holdout is never trained on
    assert [r["answer"] for r in d["trainer"]["forget"]] == texts["forget"]
    assert [r["answer"] for r in d["trainer"]["retain"]] == texts["retain1"]
    assert all(r["question"] == "" for r in d["trainer"]["forget"])


def test_the_general_qa_rows_use_the_evaluations_few_shot_prompt():
    d = generate_minimuse(0)
    qa_rows = [r for r in d["trainer"]["target"] if r["question"]]
    icl = d["knowmem"]["forget_qa_icl"]
    assert qa_rows[0]["question"].startswith(knowmem_prompt(icl, "x")[: -len("Question: x\nAnswer: ")])
    assert qa_rows[0]["question"].endswith(TEMPLATE["user_end"] + TEMPLATE["asst_start"])
    expected = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    assert knowmem_prompt(icl, "Who?") == expected + "Question: Who?\nAnswer: "


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": "0"}, "seed must be an int"),
        ({"num_forget": 1}, "num_forget must be an int in"),
        ({"num_general": 2.5}, "num_general must be an int in"),
        ({"num_icl": 0}, "num_icl must be an int in"),
        ({"num_general": 60, "num_retain": 30}, "must be <= 120"),
    ],
)
def test_bad_sizes_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_minimuse(**kwargs)


def test_raw_texts_reads_what_was_written(tmp_path):
    folder = write_minimuse(tmp_path / "m", seed=2, num_forget=3, num_retain=2, num_holdout=2, num_general=4, num_icl=1)
    assert raw_texts(folder, "forget") == [
        r["text"]
        for r in generate_minimuse(2, num_forget=3, num_retain=2, num_holdout=2, num_general=4, num_icl=1)["raw"][
            "forget"
        ]
    ]


@pytest.mark.torchrun
def test_generating_the_data_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, fastnpo.muse.minimuse as m; m.generate_minimuse(0); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
