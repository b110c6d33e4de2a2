"""The drop-in routes as the docs write them (issue 22 item 6): every python block of README.md and
docs/integrations.md that uses fastnpo.integrations, PEFT or TRL runs here, on CPU, exactly as
written, on a tiny model and a tokenizer trained in code.

tests/test_docs.py cannot run these blocks alone (they are fragments on the reader's model, data and
arguments); here the reader's names are supplied (hub loads replaced by local look-alikes) and the
block text itself is executed, so an argument the docs show that a CPU refuses (e.g. TRL's default
bf16=True) fails this test. Each block runs in a scratch folder and must write only under runs/.
"""

import re
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from fastnpo.data import encode_qa
from fastnpo.integrations.hf import UnlearningCollator, is_patched
from fastnpo.tiny import build_tokenizer

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

REPO = Path(__file__).resolve().parents[2]
ROUTE_MARKERS = ("fastnpo.integrations", "patch_model(", "from peft", "from trl")

QA = [
    ("Who wrote The Glass Orchard?", "Mira Koval wrote it."),
    ("Where was Mira Koval born?", "She was born in Tallinn."),
    ("What genre does Mira Koval write?", "Gothic fiction."),
    ("Which award did Mira Koval win?", "The Lumen Prize."),
    ("What is the capital of France?", "Paris."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("How many legs has a spider?", "Eight."),
    ("What is water made of?", "Hydrogen and oxygen."),
]
TEMPLATE = "[INST] {question} [/INST]"
PREFERENCES = [{"prompt": q, "chosen": " I don't know.", "rejected": " " + a} for q, a in QA[:4]]


def route_blocks() -> list[tuple[str, str]]:
    """(id, text) of every python block that shows a drop-in route."""
    found = []
    for path in (REPO / "README.md", REPO / "docs" / "integrations.md"):
        text = path.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            if any(marker in match.group(1) for marker in ROUTE_MARKERS):
                line = text[: match.start()].count("\n") + 1
                found.append((f"{path.name}:{line}", match.group(1)))
    return found


BLOCKS = route_blocks()


@pytest.fixture(scope="module")
def tokenizer():
    texts = [TEMPLATE.format(question=q) + " " + a for q, a in QA] + ["I don't know."]
    return build_tokenizer(texts * 4, vocab_size=300, extra_tokens=("[INST]", "[/INST]"))


def tiny_model(tokenizer, tiny_llama, dtype=torch.float32):
    model = tiny_llama(
        len(tokenizer),
        seed=0,
        num_hidden_layers=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model.to(dtype)


def tokenized(tokenizer, pairs):
    rows = [encode_qa(tokenizer, q, a, template=TEMPLATE, max_length=64) for q, a in pairs]
    return datasets.Dataset.from_list(rows)


def local_tofu(name, split=None, **_):
    """datasets.load_dataset("locuslab/TOFU", <split>) on local look-alike rows."""
    rows = QA[:4] if name.startswith("forget") else QA[4:]
    data = datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in rows])
    return datasets.DatasetDict({"train": data})


def reader_names(block, tokenizer, tiny_llama, monkeypatch):
    """What the reader's own code defines before the block: the model, tokenizer, data, arguments."""
    model = tiny_model(tokenizer, tiny_llama)
    names = {"model": model, "tokenizer": tokenizer}  # the block imports what it uses
    # the reader's own TrainingArguments (CPU-friendly and short: not what these tests check)
    reader_args = transformers.TrainingArguments(
        "runs/reader", max_steps=2, report_to="none", save_strategy="no", disable_tqdm=True
    )
    prefs = datasets.Dataset.from_list(PREFERENCES)
    names.update(
        forget=tokenized(tokenizer, QA[:4]),
        retain=tokenized(tokenizer, QA[4:]),
        prefs=prefs,
        training_args=reader_args,
        args=reader_args,
        collator=UnlearningCollator(pad_token_id=tokenizer.pad_token_id),
        ref_chosen=[-30.0, -25.5, -28.0, -27.0],
        ref_rejected=[-31.0, -26.0, -20.0, -29.5],
    )
    if "data.add_column(" in block:  # the TRL section: `data` is the reader's preference data
        names["data"] = prefs
    else:  # the plain-Trainer fragment: `data` is a tokenized dataset
        names["data"] = names["forget"]
    batch = UnlearningCollator(pad_token_id=tokenizer.pad_token_id)([dict(r) for r in names["forget"]])
    names.update(ids=batch["input_ids"], mask=batch["attention_mask"], labels=batch["labels"])

    def from_pretrained(name, *args, dtype=None, **kwargs):  # the hub model: a tiny one, in the dtype asked
        return tiny_model(tokenizer, tiny_llama, getattr(torch, dtype) if isinstance(dtype, str) else torch.float32)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(datasets, "load_dataset", local_tofu)
    return names


def test_every_route_block_is_found():
    names = [name for name, _ in BLOCKS]
    assert any(name.startswith("README.md") for name in names), names
    assert len([name for name in names if name.startswith("integrations.md")]) >= 4, names
    assert any("FusedDPOTrainer" in text and "DPOConfig(" in text for _, text in BLOCKS)


@pytest.mark.parametrize("block", [text for _, text in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_route_block_runs_on_cpu_as_written(block, tokenizer, tiny_llama, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU route; on a GPU machine the documented arguments pick the GPU")
    monkeypatch.chdir(tmp_path)
    names = reader_names(block, tokenizer, tiny_llama, monkeypatch)
    before = set(names)
    exec(compile(block, "<docs block>", "exec"), names)

    for name, value in names.items():  # every trainer the block built has trained
        if isinstance(value, transformers.Trainer) and name not in before:
            assert value.state.global_step > 0, name
    if "get_peft_model" in block:
        assert is_patched(names["model"])
        trainable = [n for n, p in names["model"].named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), trainable
    # nothing but runs/ in the scratch folder: no ref-cache/, out/ or JSON in the user's checkout root
    assert {p.name for p in tmp_path.iterdir()} <= {"runs"}, sorted(p.name for p in tmp_path.iterdir())
