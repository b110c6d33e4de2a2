"""MUSE's layout: loading from a hub-like local folder (and the hub call), clear errors, trainer rows."""

import json

import datasets
import pytest

from fastnpo.data import DataConfig, tokenize_split
from fastnpo.muse import data as muse_data
from fastnpo.muse.data import COLUMNS, SPLITS, load_muse, load_split, raw_texts, trainer_rows
from fastnpo.tiny import build_tokenizer


def _write(folder, config, split, rows):
    path = folder / config / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def layout(tmp_path):
    """A hand-written layout in the hub's shape (not Mini-MUSE: the reader must not depend on it)."""
    _write(tmp_path, "raw", "forget", [{"text": "forget one"}, {"text": "forget two"}])
    for split in ("retain1", "retain2", "holdout"):
        _write(tmp_path, "raw", split, [{"text": f"{split} text"}])
    _write(tmp_path, "verbmem", "forget", [{"prompt": "Once upon", "gt": "a time"}] * 3)
    for split in ("forget_qa", "retain_qa"):
        _write(tmp_path, "knowmem", split, [{"question": f"{split} q{i}?", "answer": f"a{i}"} for i in range(5)])
        _write(tmp_path, "knowmem", f"{split}_icl", [{"question": "icl?", "answer": "yes"}])
    for split in ("forget", "holdout", "retain"):
        _write(tmp_path, "privleak", split, [{"text": f"{split} {i}"} for i in range(4)])
    return tmp_path


def test_a_local_layout_loads_every_set(layout):
    data = load_muse(layout)
    assert data.verbmem["prompt"] == ["Once upon"] * 3 and data.verbmem["gt"] == ["a time"] * 3
    assert data.forget_qa["question"][0] == "forget_qa q0?" and data.retain_qa["answer"][4] == "a4"
    assert data.forget_qa_icl["answer"] == ["yes"]
    assert data.privleak_forget["text"] == [f"forget {i}" for i in range(4)]
    assert data.privleak_holdout["text"][0] == "holdout 0"
    assert raw_texts(layout, "forget") == ["forget one", "forget two"]


def test_max_examples_caps_all_but_the_few_shot_sets(layout):
    data = load_muse(layout, max_examples=2, privacy=False)
    assert len(data.forget_qa) == len(data.retain_qa) == len(data.verbmem) == 2
    assert data.privleak_forget is None


def test_a_missing_split_is_named(layout):
    (layout / "knowmem" / "retain_qa_icl.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"knowmem/retain_qa_icl.*missing split 'retain_qa_icl'"):
        load_muse(layout)


def test_a_missing_config_folder_is_named(layout):
    for f in (layout / "privleak").iterdir():
        f.unlink()
    (layout / "privleak").rmdir()
    with pytest.raises(FileNotFoundError, match="no 'privleak' folder"):
        load_muse(layout)
    load_muse(layout, privacy=False)  # not needed without privacy


def test_a_missing_column_is_named(layout):
    _write(layout, "verbmem", "forget", [{"prompt": "p", "text": "t"}])
    with pytest.raises(ValueError, match=r"verbmem/forget .* no 'gt' column"):
        load_muse(layout)


def test_non_string_values_and_empty_splits_are_refused(layout):
    _write(layout, "knowmem", "forget_qa", [{"question": "q", "answer": 3}])
    with pytest.raises(ValueError, match=r"'answer' of row 0 is not a string"):
        load_split(layout, "knowmem", "forget_qa")
    (layout / "raw" / "holdout.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_split(layout, "raw", "holdout")


def test_bad_arguments_are_named(layout, tmp_path):
    with pytest.raises(ValueError, match="layout must be"):
        load_muse("")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_muse(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config must be one of"):
        load_split(layout, "books", "forget")
    with pytest.raises(ValueError, match="max_rows"):
        load_split(layout, "raw", "forget", max_rows=0)
    with pytest.raises(ValueError, match="texts must be"):
        trainer_rows("one string")


def test_a_hub_name_goes_to_load_dataset_with_config_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        columns = {c: ["x"] for c in COLUMNS[name]}
        return datasets.Dataset.from_dict(columns)

    monkeypatch.setattr(muse_data.datasets, "load_dataset", fake_load_dataset)
    data = load_muse("muse-bench/MUSE-News")
    assert ("muse-bench/MUSE-News", "verbmem", "forget") in calls
    assert ("muse-bench/MUSE-News", "knowmem", "forget_qa_icl") in calls
    assert ("muse-bench/MUSE-News", "privleak", "holdout") in calls
    assert {(n, s) for _, n, s in calls} <= {(n, s) for n in SPLITS for s in SPLITS[n]}
    assert data.layout == "muse-bench/MUSE-News"


def test_a_hub_failure_names_the_split(monkeypatch):
    def failing(path, name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(muse_data.datasets, "load_dataset", failing)
    with pytest.raises(ConnectionError, match=r"MUSE verbmem/forget: cannot load split 'forget'.*offline"):
        load_muse("muse-bench/MUSE-Books")


def test_trainer_rows_train_on_the_whole_text_after_bos():
    texts = ["The town of Ashby opened a bridge.", "Second article, with 42 numbers."]
    tokenizer = build_tokenizer(texts * 4, vocab_size=300)
    config = DataConfig(forget="unused", template="{question}", answer_prefix="")
    items = tokenize_split(datasets.Dataset.from_list(trainer_rows(texts)), tokenizer, config).items
    for item, text in zip(items, texts, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert item["input_ids"] == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        # Every text token (and the eos) is a target; only <bos> is not.
        assert item["labels"] == [-100, *ids, tokenizer.eos_token_id]


def test_write_trainer_rows_makes_the_trainers_files(layout, tmp_path):
    from fastnpo.data import load_qa_split
    from fastnpo.muse.data import write_trainer_rows

    out = write_trainer_rows(layout, tmp_path / "rows")
    forget = load_qa_split(str(out), "forget")
    assert forget["answer"] == ["forget one", "forget two"] and forget["question"] == ["", ""]
    assert load_qa_split(str(out), "retain1")["answer"] == ["retain1 text"]
    with pytest.raises(ValueError, match="splits must be"):
        write_trainer_rows(layout, tmp_path / "x", splits="forget")
    with pytest.raises(FileNotFoundError, match="missing split 'retain3'"):
        write_trainer_rows(layout, tmp_path / "y", splits=["retain3"])
