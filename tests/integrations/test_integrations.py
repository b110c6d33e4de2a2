"""Drop-in integrations: the patched HF forward, the unlearning Trainer, PEFT, TRL's DPO.

Tiny models built from transformers configs and a tokenizer trained in code: no network.
"""

import copy
import math

import datasets
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastnpo.ops.chunked
from fastnpo.data import encode_qa
from fastnpo.integrations.hf import (
    UnlearningCollator,
    UnlearningTrainer,
    add_reference_logprobs,
    is_patched,
    pair_with_retain,
    patch_model,
    unpatch_model,
)
from fastnpo.losses import dpo_from_logprobs, npo_from_logprobs, simnpo_from_logprobs
from fastnpo.methods import MethodConfig
from fastnpo.tiny import build_tokenizer

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

VOCAB = 1009  # prime: B*T*V is distinctive, and no vocabulary chunk divides it
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),  # tied embeddings
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def tiny_model(arch="llama", seed=0, **overrides):
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def random_batch(batch=2, length=12, vocab=VOCAB):
    input_ids = torch.randint(3, vocab, (batch, length))
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length - 3 :] = 0  # right padding on the last row
    labels[-1, length - 3 :] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def naive_sequence_logps(logits, labels):
    """Summed log-probs of the shifted targets, from full logits (the stock path)."""
    targets = labels[:, 1:]
    logp = logits[:, :-1].float().log_softmax(-1)
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(1), mask.sum(1)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class ShapeSpy(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def largest(self):
        return max(self.shapes, key=lambda s: math.prod(s[1]))


# ============================================================================== the patch


@pytest.mark.parametrize("loss_design", ["two_call", "one_pass"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_patched_loss_and_gradients_equal_stock(arch, loss_design):
    stock = tiny_model(arch)
    model = copy.deepcopy(stock)
    batch = random_batch()
    expected = stock(**batch)
    expected.loss.backward()
    handle = patch_model(model, loss_design=loss_design)
    got = model(**batch)
    assert got.logits is None
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    want_grads, have_grads = grads(stock), grads(model)
    assert set(want_grads) == set(have_grads)
    for name in want_grads:
        torch.testing.assert_close(have_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    if arch == "gemma":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied

    # num_items_in_batch (what Trainer passes under gradient accumulation): sum / num_items
    items = torch.tensor(23)
    with torch.no_grad():
        stock_sum = stock(**batch, num_items_in_batch=items).loss
        out = model(**batch, num_items_in_batch=items, return_sequence_logprobs=True)
        logps, counts = naive_sequence_logps(stock(**batch).logits, batch["labels"])
    torch.testing.assert_close(out.loss, stock_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sequence_logps, logps, atol=1e-4, rtol=1e-5)
    assert out.token_counts.tolist() == counts.tolist()
    handle.undo()


def test_logit_rescaling_models_are_refused():
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**COMMON, head_dim=8))
    assert gemma2.config.final_logit_softcapping
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        patch_model(gemma2)
    scaled = tiny_model()
    scaled.config.logit_scale = 0.25
    with pytest.raises(NotImplementedError, match="logit_scale"):
        patch_model(scaled)
    assert not is_patched(gemma2) and not is_patched(scaled)


def test_model_without_output_embedding_says_what_to_do():
    backbone = tiny_model().model  # LlamaModel: no lm_head
    with pytest.raises(ValueError, match=r"get_output_embeddings\(\).*ForCausalLM"):
        patch_model(backbone)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        patch_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match="impl"):
        patch_model(tiny_model(), impl="fast")


@pytest.mark.parametrize("sequence_logprobs", [False, True])
def test_no_tokens_by_vocab_tensor_in_patched_forward_and_backward(monkeypatch, sequence_logprobs):
    batch = random_batch(batch=2, length=20)
    tokens = batch["input_ids"].numel()
    stock = tiny_model()
    # Positive control: the stock path materialises [B, T, V] logits (and the spy sees them).
    with ShapeSpy() as spy:
        stock(**batch).loss.backward()
    assert (2, 20, VOCAB) in [shape for _, shape in spy.shapes]

    model = patch_model(tiny_model(), return_sequence_logprobs=sequence_logprobs).model
    monkeypatch.setattr(fastnpo.ops.chunked, "CHUNK_ELEMENTS", 1024)  # vocabulary blocks of 4 x 256
    with ShapeSpy() as spy:
        out = model(**batch)
        out.loss.backward()
    name, shape = spy.largest()
    # hidden_size 16 < tokens, so the [V, D] weight gradients stay below tokens * V
    assert math.prod(shape) < tokens * VOCAB, (name, shape)
    assert not [s for _, s in spy.shapes if len(s) >= 2 and s[-1] == VOCAB and math.prod(s[:-1]) > 4]
    assert model.lm_head.weight.grad is not None


def test_unpatch_restores_stock_behaviour():
    stock = tiny_model()
    model = copy.deepcopy(stock)
    batch = random_batch()
    handle = patch_model(model)
    assert is_patched(model) and "forward" in model.__dict__
    assert patch_model(model, impl="torch") is handle and handle.impl == "torch"  # idempotent
    with torch.no_grad():
        # without labels: exactly the stock forward
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, rtol=0, atol=0)
        # positional arguments and return_dict=False behave as in the stock forward
        as_tuple = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_dict=False)
        assert torch.is_tensor(as_tuple[0]) and as_tuple[0].dim() == 0
        generated = model.generate(batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
        assert generated.tolist() == stock.generate(batch["input_ids"][:1, :5], max_new_tokens=3).tolist()
    assert unpatch_model(model) and not unpatch_model(model)
    assert "forward" not in model.__dict__ and not is_patched(model)
    with torch.no_grad():
        restored, expected = model(**batch), stock(**batch)
    torch.testing.assert_close(restored.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(restored.loss, expected.loss, rtol=0, atol=0)
    with patch_model(model):
        assert model(**batch).logits is None
    assert model(**batch).logits is not None


@pytest.mark.parametrize("loss_design", ["two_call", "one_pass"])
def test_plain_trainer_with_patch_matches_stock_under_gradient_accumulation(tmp_path, loss_design):
    """The patched model inside an unmodified transformers.Trainer: same losses, same weights,
    with gradient accumulation over micro-batches of different token counts (num_items_in_batch)."""
    rows = []
    for i, length in enumerate((9, 14, 6, 12)):
        ids = torch.randint(3, VOCAB, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (2 + i) + ids[2 + i :]})
    data = datasets.Dataset.from_list(rows)

    def run(model, out):
        args = transformers.TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            max_steps=2,
            optim="sgd",  # Adam would amplify rounding differences of near-zero gradients
            learning_rate=0.5,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, data_collator=UnlearningCollator(pad_token_id=0)
        )
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log], model

    stock_losses, stock = run(tiny_model(), tmp_path / "stock")
    model = tiny_model()
    patch_model(model, loss_design=loss_design)  # one_pass: the Trainer scales the loss (upstream gradient != 1)
    losses, model = run(model, tmp_path / "patched")
    assert losses == pytest.approx(stock_losses, rel=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), stock.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


# ============================================================================== unlearning trainer

QA = [
    ("Who wrote The Glass Orchard?", "Mira Koval wrote it in 1987."),
    ("Where was Mira Koval born?", "She was born in Tallinn."),
    ("What genre does Mira Koval write?", "She writes gothic fiction."),
    ("Which award did Mira Koval win?", "She won the Lumen Prize."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted it."),
]
TEMPLATE = "Q: {question} A:"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [TEMPLATE.format(question=q) + " " + a for q, a in QA] + ["I don't know."]
    return build_tokenizer(texts * 4, vocab_size=300)


def qa_model(tokenizer, seed=0, arch="llama"):
    return tiny_model(
        arch,
        seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def qa_dataset(tokenizer, pairs, answer=None):
    rows = []
    for q, a in pairs:
        encoded = encode_qa(tokenizer, q, answer or a, template=TEMPLATE, max_length=64)
        rows.append({"question": q, **encoded})  # a text column: remove_unused_columns must drop it
    return datasets.Dataset.from_list(rows)


def unlearning_data(tokenizer, model):
    forget = qa_dataset(tokenizer, QA[:4])
    retain = qa_dataset(tokenizer, QA[4:])
    idk = qa_dataset(tokenizer, QA[:4], answer="I don't know.")
    data = pair_with_retain(forget, retain, seed=1)
    for column in ("input_ids", "labels"):
        data = data.add_column(f"idk_{column}", idk[column])
    return add_reference_logprobs(data, model, tokenizer)


def set_batch(data, prefix=""):
    collated = UnlearningCollator(pad_token_id=0)([dict(row) for row in data])
    return {k: collated[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "labels")}


def expected_first_loss(method, stock, data, beta):
    """The method's loss on the whole data set with the stock (full-logits) model."""
    with torch.no_grad():
        forget, retain, idk = set_batch(data), set_batch(data, "retain_"), set_batch(data, "idk_")
        out = stock(**forget)
        logps, counts = naive_sequence_logps(out.logits, forget["labels"])
        ref = torch.tensor(data["ref_logp"])
        retain_nll = stock(**retain).loss
        if method == "npo":
            return npo_from_logprobs(logps, ref, beta=beta)
        if method == "npo_rt":
            return npo_from_logprobs(logps, ref, beta=beta) + retain_nll
        if method == "ga":
            return -out.loss
        if method == "graddiff":
            return -out.loss + retain_nll
        if method == "simnpo":
            return simnpo_from_logprobs(logps, counts, beta=beta) + retain_nll
        if method == "idkdpo":
            idk_logps, _ = naive_sequence_logps(stock(**idk).logits, idk["labels"])
            idk_ref = torch.tensor(data["idk_ref_logp"])
            return dpo_from_logprobs(idk_logps, logps, idk_ref, ref, beta=beta) + retain_nll
    raise AssertionError(method)


def training_args(out, **extra):
    values = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(extra)
    return transformers.TrainingArguments(**values)


@pytest.mark.parametrize("method", ["npo", "ga", "graddiff", "npo_rt", "simnpo", "idkdpo"])
def test_unlearning_trainer_first_step_loss_and_direction(tmp_path, tokenizer, method):
    model = qa_model(tokenizer)
    data = unlearning_data(tokenizer, model)
    assert "question" in data.column_names and "ref_logp" in data.column_names
    stock = copy.deepcopy(model)
    beta = 2.5 if method == "simnpo" else 0.1
    trainer = UnlearningTrainer(
        model, training_args(tmp_path), method=method, train_dataset=data, processing_class=tokenizer
    )
    assert is_patched(model)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    expected = float(expected_first_loss(method, stock, data, beta))
    assert logs[0]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    if method == "npo":
        assert expected == pytest.approx(2 / beta * math.log(2), rel=1e-5)  # logp == ref at step 0
    assert logs[0]["logps/forget"] < 0 and ("retain_nll" in logs[0]) == (method != "npo" and method != "ga")
    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), stock.parameters(), strict=True))
    assert moved
    if method in ("npo", "ga"):
        with torch.no_grad():
            forget = set_batch(data)
            before = naive_sequence_logps(stock(**forget).logits, forget["labels"])[0].sum()
            unpatch_model(model)
            after = naive_sequence_logps(model(**forget).logits, forget["labels"])[0].sum()
        assert after < before - 1.0  # unlearning pushes the forget log-probs down


NEW_METHODS = {
    "wga": MethodConfig(name="wga", wga_beta=0.5),
    "satimp": MethodConfig(name="satimp", satimp_beta1=0.5, satimp_beta2=2.0),
    "ceu": MethodConfig(name="ceu"),
    "rmu": MethodConfig(name="rmu", rmu_layer=1, rmu_update_layers=[0, 1], rmu_steering_coeff=5.0),
    "undial": MethodConfig(name="undial", undial_beta=3.0),
}


def naive_new_method_loss(config, stock, data, seed):
    """WGA / SatImp / CE-U / RMU on the whole data set from their papers' formulas, full logits
    and (RMU) a live frozen copy of the whole model."""
    from fastnpo.methods import rmu_control_vector

    forget, retain = set_batch(data), set_batch(data, "retain_")
    if config.name == "rmu":
        frozen = copy.deepcopy(stock)

        def layer_output(model, batch):
            seen = []
            handle = model.model.layers[config.rmu_layer].register_forward_hook(lambda m, a, out: seen.append(out))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            handle.remove()
            return seen[0][0] if isinstance(seen[0], tuple) else seen[0]

        mask_f, mask_r = forget["attention_mask"].bool(), retain["attention_mask"].bool()
        act = layer_output(stock, forget)
        control = rmu_control_vector(act.shape[-1], config.rmu_steering_coeff, seed)
        forget_term = ((act - control) ** 2).mean(-1)[mask_f].mean()
        retain_term = ((layer_output(stock, retain) - layer_output(frozen, retain)) ** 2).mean(-1)[mask_r].mean()
        return forget_term + config.rmu_alpha * retain_term
    out = stock(**forget)
    logits, labels = out.logits.float(), forget["labels"]
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    p = logp.detach().exp()
    retain_nll = stock(**retain).loss
    if config.name == "wga":
        return (p**config.wga_beta * logp)[mask].mean() + retain_nll
    if config.name == "satimp":
        return (p**config.satimp_beta1 * (1 - p) ** config.satimp_beta2 * logp)[mask].mean() + retain_nll
    if config.name == "undial":  # at the first step the reference is the model itself (a live copy)
        shifted, ref = logits[:, :-1][mask], copy.deepcopy(stock)(**forget).logits.float()[:, :-1][mask]
        onehot = torch.nn.functional.one_hot(targets[mask], shifted.shape[-1]).float()
        return torch.nn.functional.cross_entropy(shifted, (ref - config.undial_beta * onehot).softmax(-1))
    valid = labels != -100  # CE-U: the first answer token of each row is not scored
    skipped = labels.masked_fill(valid & (valid.cumsum(-1) <= config.ceu_ignore_first), -100)[:, 1:]
    keep = skipped != -100
    shifted = logits[:, :-1][keep]
    target = shifted.detach().clone().scatter(-1, skipped[keep][:, None], float("-inf")).softmax(-1)
    return torch.nn.functional.cross_entropy(shifted, target)


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_unlearning_trainer_new_methods_first_step_loss(tmp_path, tokenizer, method):
    config = NEW_METHODS[method]
    model = tiny_model(
        "llama",
        0,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_hidden_layers=2,
    )
    data = unlearning_data(tokenizer, model)
    stock = copy.deepcopy(model)
    trainer = UnlearningTrainer(model, training_args(tmp_path), method=config, train_dataset=data)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) for log in logs)
    with torch.no_grad():
        expected = float(naive_new_method_loss(config, stock, data, seed=0))
    assert logs[0]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    pairs = zip(model.named_parameters(), stock.named_parameters(), strict=True)
    moved = {name for (name, p), (_, q) in pairs if not torch.equal(p, q)}
    if method == "rmu":
        assert moved == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    else:
        assert len(moved) == len(list(model.parameters()))


def test_unlearning_trainer_undial_keeps_the_initial_reference_and_refuses_unseen_rows(tmp_path, tokenizer):
    """After training, the UNDIAL term is still taken toward the INITIAL model's distribution (its
    cached hidden states and lm_head), whatever order the rows arrive in; a row the trainer has
    not seen at construction has no reference and is refused."""
    model = qa_model(tokenizer)
    data = unlearning_data(tokenizer, model)
    stock = copy.deepcopy(model)
    config = MethodConfig(name="undial", undial_beta=3.0)
    args = training_args(tmp_path, per_device_train_batch_size=2, per_device_eval_batch_size=4)
    trainer = UnlearningTrainer(model, args, method=config, train_dataset=data)
    trainer.train()
    forget = set_batch(data)
    with torch.no_grad():
        unpatch_model(model)
        logits = model(**forget).logits.float()[:, :-1]
        patch_model(model)
        ref = stock(**forget).logits.float()[:, :-1]
    mask = forget["labels"][:, 1:] != -100
    onehot = torch.nn.functional.one_hot(forget["labels"][:, 1:][mask], logits.shape[-1]).float()
    target = (ref[mask] - 3.0 * onehot).softmax(-1)
    expected = float(torch.nn.functional.cross_entropy(logits[mask], target))
    assert not torch.equal(logits, ref)  # the model moved: a live-model target would differ
    assert trainer.evaluate(data.select([3, 1, 0, 2]))["eval_loss"] == pytest.approx(expected, rel=1e-5)
    unseen = qa_dataset(tokenizer, QA[4:6])
    with pytest.raises(ValueError, match="no cached reference hidden states"):
        trainer.evaluate(unseen)


def test_unlearning_trainer_gradient_accumulation(tmp_path, tokenizer):
    """GA=2 over micro-batches of 2 gives the mean of the micro-batch NPO losses (2/beta ln 2 at step 1)."""
    model = qa_model(tokenizer)
    data = unlearning_data(tokenizer, model)
    trainer = UnlearningTrainer(
        model,
        training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1),
        method="npo",
        beta=0.5,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    metrics = trainer.evaluate(data)  # the eval loop goes through the same loss
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_npo"], rel=1e-6)
    assert metrics["eval_loss"] < first["loss"]  # one NPO step lowered the forget log-probs


def count_one_pass_calls(monkeypatch) -> list:
    """Each call of the one-pass design's sweep, recorded (whether it computed the weight gradient)."""
    from fastnpo.ops import autograd

    calls, real = [], autograd.one_pass_sequence_loss

    def counted(*args, **kwargs):
        calls.append(kwargs.get("compute_dw", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(autograd, "one_pass_sequence_loss", counted)
    return calls



@pytest.mark.gpu
def test_patched_one_pass_loss_on_cuda_equals_stock():
    """loss_design="auto" on CUDA is the one-pass design (cuBLAS): the stock loss and gradients."""
    stock = tiny_model().cuda()
    model = copy.deepcopy(stock)
    batch = {k: v.cuda() for k, v in random_batch().items()}
    expected = stock(**batch)
    expected.loss.backward()
    patch_model(model)
    got = model(**batch)
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-4, rtol=1e-4)
    for name, want in grads(stock).items():
        torch.testing.assert_close(grads(model)[name], want, atol=1e-4, rtol=1e-3, msg=name)

def test_patch_loss_design_picks_the_route(monkeypatch):
    """one_pass runs the one-pass design; two_call and auto on the CPU do not; asking for the
    per-sequence log-probs always takes the token log-probs."""
    calls = count_one_pass_calls(monkeypatch)
    batch = random_batch()
    for design, expected in [("one_pass", 1), ("two_call", 0), ("auto", 0)]:
        model = tiny_model()
        patch_model(model, loss_design=design)
        model(**batch).loss.backward()
        assert len(calls) == expected, design
        calls.clear()
        model(**batch, return_sequence_logprobs=True).loss.backward()
        assert calls == [], design
    with pytest.raises(ValueError, match="loss_design must be one of"):
        patch_model(tiny_model(), loss_design="fused")


# SatImp's default weight p^5 (1 - p) is ~0 on a random model: its forget term would not move anything.
ONE_PASS_OPTIONS = {"satimp": {"satimp_beta1": 0.5}}


@pytest.mark.parametrize("method", ["npo", "ga", "graddiff", "npo_rt", "simnpo", "wga", "satimp", "ceu", "idkdpo"])
def test_unlearning_trainer_one_pass_trains_like_two_call(monkeypatch, tmp_path, tokenizer, method):
    """The separable methods, and the token-level ones whose per-token terms are elementwise in the
    token log-probs, through the one-pass design (the loss and both gradients in the patched
    forward) give the two-call path's losses and parameters after 3 steps (SGD: Adam would turn the
    1e-7 rounding differences of near-zero gradients into whole steps; no clipping, which would hide
    an error that scales the whole gradient). Chunks of ~8 target rows: several per step, so a pair
    split across chunks (IdkDPO) or a gradient taken before its example is complete would show."""
    from fastnpo.ops import one_pass

    monkeypatch.setattr(one_pass, "chunk_budget", lambda vocab_size, chunk_bytes: 4 * vocab_size * 8)
    calls = count_one_pass_calls(monkeypatch)
    model = qa_model(tokenizer)
    data = unlearning_data(tokenizer, model)
    trained = {}
    for design in ("two_call", "one_pass"):
        copied = copy.deepcopy(model)
        trainer = UnlearningTrainer(
            copied,
            training_args(tmp_path / design, optim="sgd", learning_rate=0.05, max_grad_norm=0.0),
            method=method,
            loss_design=design,
            train_dataset=data,
            **ONE_PASS_OPTIONS.get(method, {}),
        )
        trainer.train()
        trained[design] = (copied, [log for log in trainer.state.log_history if "loss" in log])
        assert len(calls) == (3 if design == "one_pass" else 0), design
    (two_call, two_call_logs), (one_pass, one_pass_logs) = trained["two_call"], trained["one_pass"]
    for before, after in zip(two_call_logs, one_pass_logs, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-6)
        assert after["logps/forget"] == pytest.approx(before["logps/forget"], rel=1e-5)
    initial = dict(model.named_parameters())
    for (name, p), (_, q) in zip(one_pass.named_parameters(), two_call.named_parameters(), strict=True):
        # the updates, not the weights: a 1% error in a gradient must show
        torch.testing.assert_close(p - initial[name], q - initial[name], atol=1e-7, rtol=2e-3, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(one_pass.parameters(), model.parameters(), strict=True))


def test_unlearning_trainer_refuses_one_pass_for_a_coupled_loss(tmp_path, tokenizer):
    model = qa_model(tokenizer)
    data = unlearning_data(tokenizer, model)
    with pytest.raises(ValueError, match=r"loss_design='one_pass'.*'rmu'"):
        UnlearningTrainer(model, training_args(tmp_path), method="rmu", loss_design="one_pass", train_dataset=data)
    with pytest.raises(ValueError, match=r"loss_design='one_pass'.*'undial'"):
        UnlearningTrainer(model, training_args(tmp_path), method="undial", loss_design="one_pass", train_dataset=data)
    with pytest.raises(ValueError, match="loss_design must be one of"):
        UnlearningTrainer(model, training_args(tmp_path), method="npo", loss_design="fast", train_dataset=data)


def test_unlearning_trainer_bad_inputs(tmp_path, tokenizer):
    model = qa_model(tokenizer)
    forget = qa_dataset(tokenizer, QA[:4])
    with pytest.raises(ValueError, match=r"'ref_logp'.*add_reference_logprobs"):
        UnlearningTrainer(model, training_args(tmp_path), method="npo", train_dataset=forget)
    with pytest.raises(ValueError, match=r"'retain_input_ids'.*pair_with_retain"):
        UnlearningTrainer(model, training_args(tmp_path), method="graddiff", train_dataset=forget)
    with pytest.raises(ValueError, match="method must be one of"):
        UnlearningTrainer(model, training_args(tmp_path), method="npo++", train_dataset=forget)
    with pytest.raises(NotImplementedError, match="KL"):
        UnlearningTrainer(model, training_args(tmp_path), method="npo_kl", train_dataset=forget)
    with pytest.raises(ValueError, match=r"get_output_embeddings\(\)"):
        UnlearningTrainer(model.model, training_args(tmp_path), method="ga", train_dataset=forget)
    # a batch without the column (a streamed or torch dataset): the error comes at the step, naming it
    data = add_reference_logprobs(forget, model, tokenizer)
    trainer = UnlearningTrainer(model, training_args(tmp_path), method="npo", train_dataset=data)
    batch = UnlearningCollator(pad_token_id=0)([dict(row) for row in forget])
    with pytest.raises(ValueError, match=r"'ref_logp'.*add_reference_logprobs"):
        trainer.compute_loss(model, batch)


def test_add_reference_logprobs_values_and_cache(tmp_path, tokenizer):
    model = qa_model(tokenizer)
    data = qa_dataset(tokenizer, QA[:4])
    messages = []
    first = add_reference_logprobs(data, model, tokenizer, batch_size=3, cache_dir=tmp_path, log=messages.append)
    again = add_reference_logprobs(data, model, tokenizer, cache_dir=tmp_path, log=messages.append)
    assert "cache miss" in messages[0] and "cache hit" in messages[-1]
    assert first["ref_logp"] == again["ref_logp"]
    batch = set_batch(data)
    with torch.no_grad():
        expected, _ = naive_sequence_logps(model(**batch).logits, batch["labels"])
    torch.testing.assert_close(torch.tensor(first["ref_logp"]), expected, atol=1e-4, rtol=1e-5)
    rows = add_reference_logprobs([dict(r) for r in data], model, tokenizer)  # a list of dicts works too
    assert [r["ref_logp"] for r in rows] == pytest.approx(first["ref_logp"], abs=1e-5)
    with pytest.raises(ValueError, match="idk_input_ids"):
        add_reference_logprobs(data, model, tokenizer, sets=["idk"])


# ============================================================================== PEFT / LoRA


def test_peft_lora_trains_adapters_only_without_full_logits(monkeypatch, tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    stock = peft.get_peft_model(tiny_model(seed=3), peft.LoraConfig(**lora))
    model = copy.deepcopy(stock)
    patch_model(model)  # a PeftModel: the transformers model inside is patched
    assert is_patched(model.get_base_model())
    # LoRA B starts at zero: give it values so the adapters change the outputs
    for m in (stock, model):
        torch.manual_seed(5)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.3)
    batch = random_batch(length=20)
    stock(**batch).loss.backward()
    monkeypatch.setattr(fastnpo.ops.chunked, "CHUNK_ELEMENTS", 1024)
    with ShapeSpy() as spy:
        out = model(**batch)
        out.loss.backward()
    torch.testing.assert_close(out.loss, stock(**batch).loss, atol=1e-5, rtol=1e-5)
    want, have = grads(stock), grads(model)
    assert set(have) == set(want) and all("lora_" in n for n in have)
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    head = model.get_base_model().lm_head.weight
    assert not head.requires_grad and head.grad is None
    tokens, dim = batch["input_ids"].numel(), head.shape[1]
    assert math.prod(spy.largest()[1]) < tokens * VOCAB
    assert (VOCAB, dim) not in [s for _, s in spy.shapes]  # the frozen lm_head: no dW computed

    # LoRA on the lm_head is refused (the fused op reads lm_head.weight only)
    bad = peft.get_peft_model(tiny_model(), peft.LoraConfig(**{**lora, "target_modules": ["lm_head"]}))
    with pytest.raises(NotImplementedError, match="target_modules"):
        patch_model(bad)

    # the unlearning trainer on a LoRA model: adapters move, the base does not
    base = qa_model(tokenizer)
    data = unlearning_data(tokenizer, base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    frozen = {n: p.clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer = UnlearningTrainer(peft_model, training_args(tmp_path, max_steps=2), method="npo", train_dataset=data)
    trainer.train()
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in adapters.items())


# ============================================================================== TRL DPO

PREFERENCES = [
    {"prompt": "Who wrote The Glass Orchard?", "chosen": " I don't know.", "rejected": " Mira Koval."},
    {"prompt": "Where was Mira Koval born?", "chosen": " I'm not sure.", "rejected": " In Tallinn."},
    {"prompt": "What genre does she write?", "chosen": " No idea.", "rejected": " Gothic fiction."},
    {"prompt": "Which award did she win?", "chosen": " I can't say.", "rejected": " The Lumen Prize."},
]


def dpo_args(out, **extra):
    from trl import DPOConfig

    values = dict(
        output_dir=str(out),
        precompute_ref_log_probs=True,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        beta=0.1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(extra)
    return DPOConfig(**values)


def fused_logps(model, batch):
    """Per-sequence log-probs from a patched copy of model, checked against the full-logits path."""
    patched = patch_model(copy.deepcopy(model)).model
    with torch.no_grad():
        logps = patched(**batch, return_sequence_logprobs=True).sequence_logps
        expected, _ = naive_sequence_logps(model(**batch).logits, batch["labels"])
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=1e-5)
    return logps


def test_trl_fused_dpo_with_precomputed_reference_columns(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    from fastnpo.integrations.trl import FusedDPOTrainer

    data = datasets.Dataset.from_list(PREFERENCES)
    ref_chosen, ref_rejected = [-30.0, -25.5, -28.0, -27.0], [-31.0, -26.0, -20.0, -29.5]
    with_ref = data.add_column("ref_chosen_logps", ref_chosen).add_column("ref_rejected_logps", ref_rejected)

    model = qa_model(tokenizer, seed=7)
    initial = copy.deepcopy(model)
    trainer = FusedDPOTrainer(model, args=dpo_args(tmp_path / "a"), train_dataset=with_ref, processing_class=tokenizer)
    prepared = trainer.train_dataset
    assert prepared["ref_chosen_logps"] == ref_chosen  # used as given, not recomputed

    # the fused log-probs of the very tokens TRL scores, at the initial weights
    def sequences(kind):
        rows = [
            {
                "input_ids": r["prompt_ids"] + r[f"{kind}_ids"],
                "labels": [-100] * len(r["prompt_ids"]) + r[f"{kind}_ids"],
            }
            for r in prepared
        ]
        batch = UnlearningCollator(pad_token_id=tokenizer.pad_token_id)(rows)
        return fused_logps(initial, batch)

    chosen, rejected = sequences("chosen"), sequences("rejected")
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    expected = dpo_from_logprobs(
        chosen, rejected, torch.tensor(ref_chosen), torch.tensor(ref_rejected), beta=0.1, scale=1.0
    )
    assert logs[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert logs[0]["logps/chosen"] == pytest.approx(float(chosen.mean()), rel=1e-5)
    assert logs[-1]["loss"] < logs[0]["loss"]

    # without the columns they are computed once with the fused op: logratios 0, loss ln 2 at step 0;
    # the log-probs are those stock TRL computes with its own chunked LM head
    fused = FusedDPOTrainer(
        qa_model(tokenizer, seed=7),
        args=dpo_args(tmp_path / "b"),
        train_dataset=data,
        processing_class=tokenizer,
    )
    torch.testing.assert_close(torch.tensor(fused.train_dataset["ref_chosen_logps"]), chosen, atol=1e-4, rtol=1e-5)
    fused.train()
    stock = trl.DPOTrainer(
        qa_model(tokenizer, seed=7),
        args=dpo_args(tmp_path / "c"),
        train_dataset=data,
        processing_class=tokenizer,
    )
    stock.train()
    first = [next(log for log in t.state.log_history if "loss" in log) for t in (fused, stock)]
    assert first[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-4), key


def test_trl_fused_dpo_refuses_what_it_cannot_do(tmp_path, tokenizer):
    pytest.importorskip("trl")
    from fastnpo.integrations.trl import FusedDPOTrainer

    data = datasets.Dataset.from_list(PREFERENCES)
    model = qa_model(tokenizer)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        FusedDPOTrainer(model, args=dpo_args(tmp_path, precompute_ref_log_probs=False), train_dataset=data)
    with pytest.raises(NotImplementedError, match="loss_type"):
        FusedDPOTrainer(model, args=dpo_args(tmp_path, loss_type=["apo_zero"]), train_dataset=data)
    with pytest.raises(ValueError, match="no reference model"):
        FusedDPOTrainer(model, ref_model=qa_model(tokenizer), args=dpo_args(tmp_path), train_dataset=data)
    half = data.add_column("ref_chosen_logps", [-1.0] * 4)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        FusedDPOTrainer(model, args=dpo_args(tmp_path), train_dataset=half, processing_class=tokenizer)
