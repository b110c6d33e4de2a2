"""The unlearning trainer, top to bottom.

1. check the config, the data and the output folder before any work;
2. load tokenizer, data and model;
3. reference log-probs: one pass of the initial model over every example a loss needs,
   cached on disk by content (refcache.py); no reference model is kept afterwards;
4. wrap (LoRA, activation checkpointing, FSDP2), optimizer, schedule, resume;
5. the loop: each step's global batch is split into grad_accum x world_size micro-batches,
   every loss term is renormalised by the step's GLOBAL example / token counts, so the
   gradient is the one of a single big batch whatever the number of processes;
6. checkpoints every K steps, metrics.jsonl, and a final Hugging Face export.
"""

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import set_seed

from .. import distributed
from ..data import build_unlearning_data, collate, collate_packed
from ..losses import kl_from_logits
from ..methods import loss_terms, method_for
from ..modeling import SequenceLogprobModel, add_lora, load_causal_lm
from ..modeling import load_tokenizer as load_tokenizer_from
from ..ops import IGNORE_INDEX
from ..profiling import peak_memory_bytes, reset_peak_memory
from ..refcache import item_logprobs, reference_logprobs
from . import checkpoint, sharding
from .config import Config, ConfigError, to_yaml, trajectory_differences

# ----------------------------------------------------------------------------- loading


def load_tokenizer(config: Config):
    return load_tokenizer_from(config.model.tokenizer or config.model.name_or_path)


def load_model(config: Config, device: torch.device):
    m = config.model
    model = load_causal_lm(
        m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation, random_init=m.random_init
    )
    return model.to(device)


def load_data(config: Config, tokenizer, method, micro_per_step: int):
    """The example sets the method reads, and the step sampler. The sampler draws GLOBAL
    batches (micro-batch size x processes x grad_accum) so that the data order, and hence the
    run, does not depend on how a step is split across processes."""
    data_config = dataclasses.replace(
        config.data,
        retain=config.data.retain if "retain" in method.sets else "",
        batch_size=config.data.batch_size * micro_per_step,
        retain_batch_size=config.data.retain_batch_size * micro_per_step,
    )
    data = build_unlearning_data(data_config, tokenizer, idk="idk" in method.sets)
    sets = {"forget": data.forget.items}
    if data.retain is not None:
        sets["retain"] = data.retain.items
    if data.idk is not None:
        sets["idk"] = data.idk.items
    return sets, data.batches


def collate_micro_batch(items: list[dict], config: Config, tokenizer) -> dict:
    if config.data.packing:
        return collate_packed(items, config.data.pack_tokens, tokenizer.pad_token_id)
    return collate(items, tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- output folder


def prepare_output_dir(config: Config, info: distributed.ProcessInfo) -> Path | None:
    """Decide between a fresh run and a resume; refuse what would overwrite or mix runs.

    Returns the checkpoint to resume from, or None."""
    out = Path(config.run.output_dir)
    checkpoints = checkpoint.checkpoint_steps(out / "checkpoints")
    finished = (out / "final").exists() or ((out / "run_info.json").exists() and not checkpoints)
    if config.run.resume and checkpoints:
        saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
        current = OmegaConf.to_container(OmegaConf.structured(config))
        differences = trajectory_differences(saved, current)
        if differences:
            raise ConfigError(
                f"{out} holds checkpoints of a run with another config; resume refused. Differences: "
                + "; ".join(differences)
                + ". Use another run.output_dir, or run.resume=false run.overwrite=true."
            )
        return out / "checkpoints" / f"step_{checkpoints[-1]}"
    if (checkpoints or finished) and not config.run.overwrite:
        raise ConfigError(f"run.output_dir {out} already holds a run; set run.overwrite=true to replace it")
    if info.is_main and config.run.overwrite and out.exists():
        shutil.rmtree(out)
    return None


# ----------------------------------------------------------------------------- reference log-probs


def cached_reference_logprobs(config, model, tokenizer, sets, ref_sets, info, log):
    """The reference pass (refcache.reference_logprobs), cached in run.cache_dir or, by default,
    in ref-cache/ beside the output folder (shared by runs beside each other)."""
    cache_dir = Path(config.run.cache_dir or Path(config.run.output_dir).resolve().parent / "ref-cache")
    return reference_logprobs(
        model,
        tokenizer,
        {name: sets[name] for name in ref_sets},
        pad_token_id=tokenizer.pad_token_id,
        batch_size=2 * config.data.batch_size,
        impl=config.model.impl,
        cache_dir=cache_dir,
        info=info,
        progress=config.run.progress,
        log=log,
    )


# ----------------------------------------------------------------------------- optimisation


def linear_schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def split_micro_batches(items: list[dict] | None, parts: int) -> list[list[dict] | None]:
    if items is None:
        return [None] * parts
    size = math.ceil(len(items) / parts)
    return [items[i * size : (i + 1) * size] for i in range(parts)]


def target_tokens(items: list[dict]) -> int:
    # labels[0] is always a prompt token; after the shift the targets are labels[1:].
    return sum(sum(1 for label in item["labels"][1:] if label != IGNORE_INDEX) for item in items)


# ----------------------------------------------------------------------------- the run


def train(config: Config, on_epoch_end=None) -> dict:
    """Run the config. on_epoch_end(epoch, model) is called on rank 0 after each full epoch
    with the Hugging Face model (single process only: the demo evaluates there); a dict it
    returns is written to epochs.jsonl and returned under "epochs"."""
    info = distributed.setup(config.run.device)
    try:
        return _train(config, info, on_epoch_end)
    finally:
        distributed.teardown()


def _train(config: Config, info: distributed.ProcessInfo, on_epoch_end=None) -> dict:
    def log(message: str) -> None:
        if info.is_main:
            tqdm.write(message)

    method = method_for(config.method.name)
    resume_from = prepare_output_dir(config, info)
    out = Path(config.run.output_dir)
    set_seed(config.run.seed)

    tokenizer = load_tokenizer(config)
    micro_per_step = config.optim.grad_accum * info.world_size
    sets, batches = load_data(config, tokenizer, method, micro_per_step)  # raises on bad data, before any work
    weights_by_index = None
    if config.run.example_weights:
        weights_by_index = torch.tensor(json.loads(Path(config.run.example_weights).read_text()), dtype=torch.float32)
        if (
            weights_by_index.dim() != 1
            or bool((weights_by_index < 0).any())
            or not torch.isfinite(weights_by_index).all()
        ):
            raise ConfigError("run.example_weights must be a JSON list of finite numbers >= 0")

    model = load_model(config, info.device)
    reference_model = None
    if method.live_reference:  # NPO+KL: the one loss that needs the reference distribution
        import copy

        reference_model = SequenceLogprobModel(
            copy.deepcopy(model).eval().requires_grad_(False), impl=config.model.impl
        )

    ref, cache_hit = None, None
    if method.ref_sets:
        ref, cache_hit = cached_reference_logprobs(config, model, tokenizer, sets, method.ref_sets, info, log)

    if config.model.lora.enabled:
        model = add_lora(model, config.model.lora)
    if config.distributed.activation_checkpointing:
        # transformers 5 renamed it; keep working on 4.x.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = SequenceLogprobModel(model, impl=config.model.impl)
    sharded = sharding.use_fsdp(config.distributed, info)
    if sharded:
        sharding.shard(wrapper, config.distributed, info)
        if reference_model is not None:
            sharding.shard(reference_model, config.distributed, info)
    autocast = config.distributed.mixed_precision == "bf16" and not sharded

    parameters = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    steps_per_epoch = len(batches)
    total_steps = config.optim.max_steps or math.ceil(config.optim.epochs * steps_per_epoch)
    warmup_steps = round(config.optim.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))

    step = 0
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, wrapper, optimizer, info)
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        step = state["step"]
        log(f"resumed from {resume_from} at step {step}")

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(config))
        run_info = {
            "reference_cache_hit": cache_hit,
            "world_size": info.world_size,
            "fsdp": sharded,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "resumed_from_step": step,
            "cache_key": ref.key if ref is not None else None,
        }
        (out / "run_info.json").write_text(json.dumps(run_info, indent=1))
    writer = None
    if config.run.tensorboard and info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    if on_epoch_end is not None and sharded:
        raise ConfigError("on_epoch_end needs the unsharded model: run in one process")
    epoch_reports = []
    metrics_file = open(out / "metrics.jsonl", "a") if info.is_main else None
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"{config.method.name}",
        disable=not (config.run.progress and info.is_main),
    )
    wrapper.train()
    while step < total_steps:
        started = time.perf_counter()
        reset_peak_memory(info.device)
        global_batch = batches.next_items()
        norms = {}
        for name in method.sets:
            norms[f"{name}_examples"] = len(global_batch[name])
            norms[f"{name}_tokens"] = target_tokens(global_batch[name])
        per_set = {name: split_micro_batches(global_batch.get(name), micro_per_step) for name in method.sets}

        term_totals: dict[str, float] = {}
        sums = {name: 0.0 for name in method.sets}
        tokens = 0
        for micro in range(config.optim.grad_accum):
            slot = micro * info.world_size + info.rank
            parts = {name: per_set[name][slot] for name in method.sets}
            lengths = {name: len(parts[name]) for name in method.sets}
            if lengths[method.sets[0]] == 0:
                continue
            # One forward over the concatenated sets: rows[name] says where each set sits.
            rows, start = {}, 0
            for name in method.sets:
                rows[name] = slice(start, start + lengths[name])
                start += lengths[name]
            batch = collate_micro_batch([it for name in method.sets for it in parts[name]], config, tokenizer)
            batch = {k: v.to(info.device) for k, v in batch.items()}
            tokens += int(
                (batch["segment_ids"] >= 0).sum() if "segment_ids" in batch else batch["attention_mask"].sum()
            )
            logits_rows = rows["retain"] if reference_model is not None else None
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
                logps_all, counts_all, logits = wrapper(batch, logits_rows=logits_rows)
            logps = {name: logps_all[r].float() for name, r in rows.items()}
            counts = {name: counts_all[r] for name, r in rows.items()}
            index = batch["index"].cpu()
            ref_logps = {name: ref.lookup(name, index[rows[name]])[0].to(info.device) for name in method.ref_sets}
            weights = None
            if weights_by_index is not None:
                forget_index = index[rows["forget"]]
                if int(forget_index.max()) >= len(weights_by_index):
                    raise ConfigError(f"run.example_weights has {len(weights_by_index)} entries, forget set needs more")
                weights = weights_by_index[forget_index].to(info.device)
            kl = None
            if reference_model is not None:
                with torch.no_grad():
                    _, _, ref_logits = reference_model(batch, logits_rows=logits_rows)
                kl = kl_from_logits(logits, ref_logits, batch["labels"][logits_rows])
            terms = loss_terms(config.method, logps, counts, ref_logps, weights=weights, kl=kl)
            loss = logps_all.new_zeros(())
            for key, term in terms.items():
                set_name, unit = term.normalizer.split("_")
                local = lengths[set_name] if unit == "examples" else int(counts[set_name].sum())
                share = local / max(1, norms[term.normalizer])
                loss = loss + term.coeff * term.value * share * info.world_size
                term_totals[key] = term_totals.get(key, 0.0) + float(term.value.detach()) * share
            loss.backward()
            for name in method.sets:
                sums[name] += float(logps[name].detach().sum())

        grad_norm = torch.tensor(0.0)
        if config.optim.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.optim.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Global statistics for the log: one small all-reduce per step.
        keys = sorted(term_totals)
        stats = torch.tensor(
            [term_totals[k] for k in keys] + [sums[n] for n in method.sets] + [tokens],
            dtype=torch.float64,
            device=info.device,
        )
        stats = distributed.all_reduce_sum(stats, info).cpu().tolist()
        elapsed = time.perf_counter() - started
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4)}
        record.update({k: stats[i] for i, k in enumerate(keys)})
        record["loss"] = sum(stats[i] * terms[k].coeff for i, k in enumerate(keys))
        for j, name in enumerate(method.sets):
            record[f"mean_{name}_logp"] = stats[len(keys) + j] / max(1, norms[f"{name}_examples"])
        record.update(
            {
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": stats[-1] / elapsed,
                "peak_memory_mib": peak_memory_bytes(info.device) / 2**20,
            }
        )
        if info.is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if writer is not None:
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, step)
            if config.run.log_every and (step % config.run.log_every == 0 or step == total_steps):
                shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "epoch"))
                log(f"step {step}/{total_steps} epoch {record['epoch']:.2f} {shown}")
        bar.update(1)
        if on_epoch_end is not None and step % steps_per_epoch == 0:
            report = on_epoch_end(step // steps_per_epoch, model)
            if report is not None:
                epoch_reports.append({"epoch": step // steps_per_epoch, **report})
                with open(out / "epochs.jsonl", "a") as epochs_file:
                    epochs_file.write(json.dumps(epoch_reports[-1]) + "\n")
            wrapper.train()
        if config.run.checkpoint_every and step % config.run.checkpoint_every == 0 and step < total_steps:
            checkpoint.save_checkpoint(
                out / "checkpoints",
                step,
                wrapper,
                optimizer,
                {"step": step, "scheduler": scheduler.state_dict(), "batches": batches.state_dict()},
                info,
                keep=config.run.keep_checkpoints,
            )
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    if writer is not None:
        writer.close()

    final = out / "final"
    if config.run.export:
        export_hf(wrapper, model, tokenizer, final, info, lora=config.model.lora.enabled)
        log(f"exported {final}")
    distributed.barrier(info)
    return {
        "epochs": epoch_reports,
        "output_dir": str(out),
        "steps": step,
        "reference_cache_hit": cache_hit,
        "final": str(final) if config.run.export else None,
    }


def export_hf(wrapper, model, tokenizer, path: Path, info, *, lora: bool) -> None:
    """A Hugging Face folder (safetensors) that from_pretrained loads; LoRA runs save the adapter."""
    state = checkpoint.full_state_dict(wrapper)
    if not info.is_main:
        return
    state = {k.removeprefix("lm."): v for k, v in state.items()}
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(model, state_dict=state)
        model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
    else:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def build_reference_cache(config: Config, verify: int = 0) -> dict:
    """`fastnpo cache-ref`: the reference pass alone (and optionally a recomputed sample)."""
    info = distributed.setup(config.run.device)
    try:
        method = method_for(config.method.name)
        if not method.ref_sets:
            raise ConfigError(f"method {config.method.name} uses no cached reference log-probs")
        tokenizer = load_tokenizer(config)
        sets, _ = load_data(config, tokenizer, method, 1)
        model = load_model(config, info.device)
        log = tqdm.write if info.is_main else (lambda message: None)
        ref, hit = cached_reference_logprobs(config, model, tokenizer, sets, method.ref_sets, info, log)
        report = None
        if verify:
            from ..refcache import verify_ref_logprobs

            wrapper = SequenceLogprobModel(model, impl=config.model.impl).eval()
            by_index = {name: {item["index"]: item for item in sets[name]} for name in method.ref_sets}

            def recompute(name, indices):
                items = [by_index[name][int(i)] for i in indices]
                return item_logprobs(wrapper, items, tokenizer.pad_token_id, 2 * config.data.batch_size)[0]

            report = verify_ref_logprobs(ref, recompute, sample=verify, seed=config.run.seed)
            log(f"verified {verify} examples per set: {report}")
        return {"key": ref.key, "hit": hit, "verify": report}
    finally:
        distributed.teardown()
