"""fastnpo.data: loading, answer-only labels, batching, packing (checked against a real Llama
through modeling.SequenceLogprobModel, as the trainer runs it),
forget/retain/idk pairing and resumption. Offline: tokenizers are trained in code and the hub
branch is exercised through a monkeypatched datasets.load_dataset."""

import copy
import json
import random

import datasets
import numpy as np
import pytest
import torch

from fastnpo.data import (
    DEFAULT_IDK_ANSWERS,
    DataConfig,
    PairedBatches,
    QADataset,
    add_idk_answers,
    build_unlearning_data,
    collate,
    collate_packed,
    encode_qa,
    idk_answers,
    length_grouped_batches,
    load_qa_split,
    tokenize_split,
)
from fastnpo.modeling import SequenceLogprobModel
from fastnpo.tiny import build_tokenizer

WORDS = "alpha beta gamma delta author book city river born wrote novel prize year north south".split()


def make_rows(n, seed=0, min_words=1, max_words=12):
    rng = random.Random(seed)
    return [
        {
            "question": f"What did author {i} write about "
            + " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            + "?",
            "answer": " ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) + ".",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["[INST]", "[/INST]", *(r["question"] + " " + r["answer"] for r in make_rows(50))]
    return build_tokenizer(texts, vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bos_prompt(tokenizer, text):
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------------- loading


def test_load_local_forms(tmp_path):
    rows = make_rows(5)
    write_jsonl(tmp_path / "forget10.jsonl", rows)
    (tmp_path / "array.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "forget10.parquet"))
    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(parquet_dir / "retain90.parquet"))

    for source, split in [
        (str(tmp_path / "forget10.jsonl"), "ignored"),
        (str(tmp_path / "array.json"), "ignored"),
        (str(tmp_path / "forget10.parquet"), "ignored"),
        (str(tmp_path), "forget10"),  # the directory form prefers .jsonl
        (str(parquet_dir), "retain90"),
    ]:
        data = load_qa_split(source, split)
        assert data["question"] == [r["question"] for r in rows], source
        assert data["answer"] == [r["answer"] for r in rows], source



def test_a_local_file_loads_without_a_network_call(tmp_path, monkeypatch):
    """datasets.load_dataset pings the hub to count a load (an HTTP HEAD, even for a local file:
    a ~5 s stall where there is no network); local files are read without it, every form."""
    import socket

    from datasets import config

    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: calls.append(args) or [])
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)  # as on a machine where nothing says offline
    monkeypatch.setattr(config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    rows = make_rows(3)
    write_jsonl(tmp_path / "forget10.jsonl", rows)
    (tmp_path / "array.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "retain90.parquet"))
    for source, split in [
        (str(tmp_path / "forget10.jsonl"), "ignored"),
        (str(tmp_path / "array.json"), "ignored"),
        (str(tmp_path), "retain90"),
    ]:
        assert load_qa_split(source, split)["question"] == [r["question"] for r in rows], source
    assert calls == []

def test_load_hub_branch_calls_load_dataset_with_config_name(monkeypatch):
    rows = make_rows(3)
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_qa_split("locuslab/TOFU", "forget10")
    assert calls == [(("locuslab/TOFU", "forget10"), {"split": "train"})]
    assert len(data) == 3 and data["answer"][2] == rows[2]["answer"]


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_qa_split(str(tmp_path / "nope.jsonl"), "forget10")
    with pytest.raises(FileNotFoundError, match="forget05"):
        load_qa_split(str(tmp_path), "forget05")
    with pytest.raises(ValueError, match="source"):
        load_qa_split("", "forget10")
    bad = tmp_path / "x.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"\.csv"):
        load_qa_split(str(bad), "forget10")

    no_answer = write_jsonl(tmp_path / "noanswer.jsonl", [{"question": "q", "reply": "a"}])
    with pytest.raises(ValueError, match=r"'answer'.*columns") as info:
        load_qa_split(str(no_answer), "forget10", what="forget set")
    assert "noanswer.jsonl" in str(info.value)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"forget set .*empty\.jsonl.* is empty"):
        load_qa_split(str(empty), "forget10", what="forget set")
    datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(ValueError, match=r"retain set .* is empty"):
        load_qa_split(str(tmp_path / "e.parquet"), "retain90", what="retain set")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"question": [], "answer": []})
    )
    with pytest.raises(ValueError, match=r"forget set 'locuslab/TOFU' .* is empty"):
        load_qa_split("locuslab/TOFU", "forget10", what="forget set")


def test_config_validation():
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="no placeholder")
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="{question} {answer}")
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="pack_tokens"):
        DataConfig(packing=True, pack_tokens=64, max_length=128)
    DataConfig(template="chat")
    DataConfig(template="Q: {question} {{literal}}")


# ------------------------------------------------------------------------------ tokenisation


def test_encode_qa_masks_exactly_the_prompt(tokenizer):
    question, answer = "Where was author 3 born?", "author 3 was born in north city."
    template = "[INST] {question} [/INST]"
    ex = encode_qa(tokenizer, question, answer, template=template, answer_prefix=" ", max_length=256)
    prompt = bos_prompt(tokenizer, template.format(question=question))
    reply = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex["input_ids"] == prompt + reply
    assert ex["labels"] == [-100] * len(prompt) + reply
    assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["labels"][len(prompt) : -1]) == " " + answer


def test_encode_qa_truncation(tokenizer):
    question, answer = "Where was author 3 born?", "author 3 was born in north city by the river."
    full = encode_qa(tokenizer, question, answer, max_length=256)
    n_prompt = full["labels"].count(-100)
    with pytest.warns(UserWarning, match="truncated"):
        cut = encode_qa(tokenizer, question, answer, max_length=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert cut["labels"] == full["labels"][: n_prompt + 2]
    with pytest.raises(ValueError, match="no answer token"):
        encode_qa(tokenizer, question, answer, max_length=n_prompt)


def test_tokenize_split_warns_once_and_names_the_example(tokenizer):
    rows = [
        {"question": "q", "answer": "a"},
        {"question": "q", "answer": "long " * 80},
        {"question": "q?", "answer": "b."},
    ]
    data = datasets.Dataset.from_list(rows)
    long_question = datasets.Dataset.from_list([rows[0], {"question": "q " * 80, "answer": "a"}])
    with pytest.raises(ValueError, match="example 1"):
        tokenize_split(long_question, tokenizer, DataConfig(max_length=60))
    config = DataConfig(max_length=60)
    with pytest.warns(UserWarning) as record:
        ds = tokenize_split(data.select([0, 1, 2]), tokenizer, config)
    messages = [str(w.message) for w in record if "truncated" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("1 of 3")
    assert [item["index"] for item in ds] == [0, 1, 2]
    assert max(ds.lengths) == 60
    for k in (0, 2):
        single = encode_qa(tokenizer, rows[k]["question"], rows[k]["answer"], max_length=60)
        assert ds[k]["input_ids"] == single["input_ids"] and ds[k]["labels"] == single["labels"]
    with pytest.raises(ValueError, match="'idk_answer'"):
        tokenize_split(data, tokenizer, config, answer_column="idk_answer")


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user: {{ m['content'] }}\n"
    "{% else %}assistant:\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def test_chat_template(tokenizer):
    chat_tok = copy.deepcopy(tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        encode_qa(chat_tok, "q", "a", template="chat")
    chat_tok.chat_template = CHAT_TEMPLATE
    question, answer = "Where was author 3 born?", "north city."
    ex = encode_qa(chat_tok, question, answer, template="chat", max_length=256)
    prompt = chat_tok(f"user: {question}\nassistant:\n", add_special_tokens=False)["input_ids"]
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt and ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert chat_tok.decode(ex["input_ids"][n:]) == answer + "<eos>\n"
    assert chat_tok.eos_token_id in ex["labels"]
    ds = tokenize_split(
        datasets.Dataset.from_list([{"question": question, "answer": answer}]),
        chat_tok,
        DataConfig(template="chat"),
    )
    assert ds[0]["input_ids"] == ex["input_ids"] and ds[0]["labels"] == ex["labels"]

    chat_tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        encode_qa(chat_tok, question, answer, template="chat")


# ---------------------------------------------------------------------------------- batching


def padding_waste(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1000).tolist()
    a = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert a == length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert a != length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert a != length_grouped_batches(lengths, 8, seed=4, epoch=0)
    for epoch in range(3):
        batches = length_grouped_batches(lengths, 8, seed=3, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) == 8 for b in batches)
        waste = padding_waste(batches, lengths)
        perm = rng.permutation(1000).tolist()
        random_waste = padding_waste([perm[i : i + 8] for i in range(0, 1000, 8)], lengths)
        assert waste < 0.2 * random_waste
    # 1003 = 125 full batches + one of 3, dropped with drop_last.
    lengths = [*lengths, 7, 8, 9]
    assert sorted(len(b) for b in length_grouped_batches(lengths, 8, seed=0, epoch=0))[0] == 3
    kept = length_grouped_batches(lengths, 8, seed=0, epoch=0, drop_last=True)
    assert len(kept) == 125 and all(len(b) == 8 for b in kept)
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches(lengths, 0, seed=0, epoch=0)


def test_collate():
    items = [
        {"index": 7, "input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"index": 2, "input_ids": [4, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]},
    ]
    batch = collate(items, pad_token_id=99)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 99, 99], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 6, 7, 8]]
    assert batch["index"].tolist() == [7, 2]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(items, None)


# ----------------------------------------------------------------------------------- packing


def llama(tiny_llama, attn, vocab_size):
    model = tiny_llama(vocab_size, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model


def random_items(n, vocab_size, seed):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        n_prompt, n_answer = rng.randint(1, 6), rng.randint(1, 9)
        ids = [rng.randrange(vocab_size) for _ in range(n_prompt + n_answer)]
        items.append({"index": 100 + i, "input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return items


def unpacked_logprobs(model, items):
    batch = collate(items, pad_token_id=0)
    logps, counts, _ = SequenceLogprobModel(model, impl="torch")(batch)
    return dict(zip(batch["index"].tolist(), zip(logps, counts.tolist(), strict=True), strict=True))


def row_batches(batch, items, pack_tokens):
    """Each row of a collate_packed batch again as a batch of its own (its examples alone)."""
    by_index = {it["index"]: it for it in items}
    for r in range(batch["input_ids"].shape[0]):
        row_examples = batch["segment_ids"][r].unique().tolist()
        indices = [batch["index"][e].item() for e in row_examples if e >= 0]
        yield collate_packed([by_index[i] for i in indices], pack_tokens=pack_tokens, pad_token_id=0)


# Only the position_ids route is checked: it is the one the trainer takes
# (SequenceLogprobModel passes no attention mask on packed rows, use_cache=False).
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_equals_unpacked(tiny_llama, attn):
    vocab_size = 61
    model = llama(tiny_llama, attn, vocab_size)
    items = random_items(9, vocab_size, seed=1)
    expected = unpacked_logprobs(model, items)

    packed = collate_packed(items, pack_tokens=32, pad_token_id=0)
    rows = list(row_batches(packed, items, 32))
    assert len(rows) > 1 and all(r["input_ids"].shape == (1, r["input_ids"].shape[1]) for r in rows)
    assert all(r["input_ids"].shape[1] <= 32 for r in rows)
    assert sorted(i for r in rows for i in r["index"].tolist()) == sorted(expected)
    for batch in [*rows, packed]:  # single rows, then [R, L]
        starts = (batch["position_ids"] == 0) & (batch["segment_ids"] >= 0)
        assert (batch["labels"][starts] == -100).all()
        logps, counts, _ = SequenceLogprobModel(model, impl="torch")(batch)
        assert logps.shape == counts.shape == batch["index"].shape
        for k, index in enumerate(batch["index"].tolist()):
            torch.testing.assert_close(logps[k], expected[index][0], atol=1e-5, rtol=0)
            assert counts[k].item() == expected[index][1]


def test_packed_gradients_match_unpacked(tiny_llama):
    vocab_size = 53
    model = llama(tiny_llama, "sdpa", vocab_size)
    items = random_items(5, vocab_size, seed=2)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in (model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight)]

    weights = torch.randn(len(items))
    unpacked = unpacked_logprobs(model, items)
    ref = grads(sum(w * unpacked[it["index"]][0] for w, it in zip(weights, items, strict=True)))
    batch = collate_packed(items, pack_tokens=24, pad_token_id=0)
    logps, _, _ = SequenceLogprobModel(model, impl="torch")(batch)
    order = {index: k for k, index in enumerate(batch["index"].tolist())}
    got = grads(sum(w * logps[order[it["index"]]] for w, it in zip(weights, items, strict=True)))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_pack_errors_and_order():
    items = random_items(6, 40, seed=3)
    batch = collate_packed(items, pack_tokens=20, pad_token_id=0)
    assert batch["index"].tolist() == [it["index"] for it in items]
    n = len(items[0]["input_ids"])
    assert batch["segment_ids"][0, :n].eq(0).all() and batch["position_ids"][0, :n].tolist() == list(range(n))
    full = collate_packed(items, pack_tokens=20, pad_token_id=5)
    assert full["input_ids"].shape[0] > 1 and full["input_ids"].shape[1] <= 20
    tail = full["segment_ids"] == -1
    assert tail.any()
    assert (full["input_ids"][tail] == 5).all() and (full["labels"][tail] == -100).all()
    with pytest.raises(ValueError, match=r"example 100 has .* pack_tokens=4"):
        collate_packed(items, pack_tokens=4, pad_token_id=0)


# ----------------------------------------------------------------------------------- pairing


def make_qa(lengths, offset=0):
    return QADataset(
        [
            {"index": i, "input_ids": [offset + i] * n, "labels": [-100] + [offset + i] * (n - 1)}
            for i, n in enumerate(lengths)
        ]
    )


def indices(step, name):
    return [item["index"] for item in step[name]]


def run_epoch(batches):
    """The steps left in the current epoch, through next_items as the trainer draws them."""
    return [batches.next_items() for _ in range(len(batches) - batches.step)]


def test_paired_batches_resume_and_epochs():
    rng = np.random.default_rng(0)
    forget = make_qa(rng.integers(2, 30, size=37).tolist())
    retain = make_qa(rng.integers(2, 30, size=23).tolist(), offset=1000)
    kwargs = dict(batch_size=4, retain_batch_size=5, seed=7)
    a = PairedBatches(forget, retain, **kwargs)
    assert len(a) == 10

    epoch0 = run_epoch(a)
    # next_items rolls over lazily: (0, 10) is the end of epoch 0, the same point as (1, 0).
    assert a.state_dict()["epoch"] == 0 and a.state_dict()["step"] == 10
    assert sorted(i for s in epoch0 for i in indices(s, "forget")) == list(range(37))
    expected = length_grouped_batches(forget.lengths, 4, seed=7, epoch=0)
    assert [indices(s, "forget") for s in epoch0] == expected
    assert all(len(s["retain"]) == 5 for s in epoch0)
    # The 4 full retain batches of a cycle cover 20 distinct examples.
    first_cycle = [i for s in epoch0[:4] for i in indices(s, "retain")]
    assert len(set(first_cycle)) == 20

    epoch1_head = [a.next_items() for _ in range(3)]
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["step"] == 3
    state = a.state_dict()
    rest_a = run_epoch(a)
    epoch2_a = [a.next_items() for _ in range(10)]

    b = PairedBatches(forget, retain, **kwargs)
    b.load_state_dict(state)
    rest_b = run_epoch(b)
    epoch2_b = [b.next_items() for _ in range(10)]
    assert len(rest_a) == len(rest_b) == 7
    assert rest_a + epoch2_a == rest_b + epoch2_b
    assert [indices(s, "forget") for s in epoch0] != [indices(s, "forget") for s in epoch1_head + rest_a]

    c = PairedBatches(forget, None, **kwargs)
    c.load_state_dict({"epoch": 2, "step": 0})
    steps = run_epoch(c)
    assert all(s["retain"] is None for s in steps)
    for x, y in zip(steps, epoch2_a, strict=True):
        assert x["forget"] == y["forget"]

    with pytest.raises(ValueError, match="seed"):
        PairedBatches(forget, retain, **{**kwargs, "seed": 8}).load_state_dict(state)
    with pytest.raises(ValueError, match="step"):
        PairedBatches(forget, retain, **kwargs).load_state_dict({**state, "step": 11})


def test_idk_answers_and_alignment(tmp_path, tokenizer):
    rows = make_rows(21, seed=5)
    write_jsonl(tmp_path / "forget10.jsonl", rows)
    write_jsonl(tmp_path / "retain90.jsonl", make_rows(30, seed=6))

    assert idk_answers(DataConfig()) == list(DEFAULT_IDK_ANSWERS) and len(DEFAULT_IDK_ANSWERS) >= 20
    custom = tmp_path / "idk.txt"
    custom.write_text("No idea.\n\n  Can't say.  \n")
    assert idk_answers(DataConfig(idk_answers=str(custom))) == ["No idea.", "Can't say."]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        idk_answers(DataConfig(idk_answers=str(tmp_path / "missing.txt")))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"blank\.txt"):
        idk_answers(DataConfig(idk_answers=str(tmp_path / "blank.txt")))

    picked = add_idk_answers(datasets.Dataset.from_list(rows), DEFAULT_IDK_ANSWERS, seed=1)["idk_answer"]
    assert (
        picked == add_idk_answers(datasets.Dataset.from_list(rows), DEFAULT_IDK_ANSWERS, seed=1)["idk_answer"]
    )
    assert len(set(picked)) > 5 and set(picked) <= set(DEFAULT_IDK_ANSWERS)

    with pytest.raises(ValueError, match="forget"):
        build_unlearning_data(DataConfig(), tokenizer)
    for packing in (False, True):
        config = DataConfig(
            forget=str(tmp_path),
            retain=str(tmp_path),
            batch_size=4,
            retain_batch_size=3,
            packing=packing,
            pack_tokens=256,
            seed=1,
        )
        data = build_unlearning_data(config, tokenizer, idk=True)
        assert len(data.forget) == len(data.idk) == 21 and len(data.retain) == 30
        steps = run_epoch(data.batches)
        assert len(steps) == 6
        for step in steps:
            assert set(step) == {"forget", "retain", "idk"}
            # Collated as the trainer does (train.loop.collate_micro_batch).
            pad = tokenizer.pad_token_id
            forget, idk = (
                collate_packed(step[k], 256, pad) if packing else collate(step[k], pad) for k in ("forget", "idk")
            )
            assert torch.equal(forget["index"], idk["index"])
        for f, k in zip(data.forget, data.idk, strict=True):
            n_prompt = f["labels"].count(-100)
            assert f["input_ids"][:n_prompt] == k["input_ids"][:n_prompt]  # same question
            answer = tokenizer.decode(k["input_ids"][n_prompt:-1])
            assert answer.strip() in DEFAULT_IDK_ANSWERS
    with pytest.raises(ValueError, match="aligned"):
        PairedBatches(data.forget, idk=QADataset(list(data.idk)[::-1]))
