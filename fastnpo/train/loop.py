"""The unlearning run top to bottom (train), and the reference pass alone (build_reference_cache,
`fastnpo cache-ref`).

1. check the output folder and the data before any work (output.py);
2. load the model; the reference log-probs: one pass of the initial model over every example a
   loss needs, cached on disk by content (refcache/); no reference model is kept afterwards
   (except the frozen copy of a method that needs the reference's full distribution); what the
   method builds once (Method.prepare, setup.prepare_method: e.g. frozen layers, or the
   reference's final hidden states of the forget answer tokens) is built from the initial model;
3. wrap (LoRA, activation checkpointing, FSDP2), optimizer, schedule, resume;
4. the steps (step.py), logged (logging.py) and checkpointed every run.checkpoint_every steps;
   with eval.every_epoch, an evaluation after each epoch and the best epoch kept
   (evaluation.py);
5. a final Hugging Face export.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from .. import distributed
from ..methods import method_for
from ..modeling import SequenceLogprobModel
from ..profiling import reset_peak_memory
from ..refcache import cache_path, item_logprobs
from . import checkpoint
from .config import Config, ConfigError
from .evaluation import EpochEvaluation
from .logging import RunLogger, console, mark_finished, write_run_files
from .optimizers import StepInBackward
from .output import OutputFolder, OutputLock, prepare_output_dir
from .setup import (
    build_optimizer,
    cached_reference_logprobs,
    check_model_sources,
    check_offload,
    check_optimizer,
    frozen_reference,
    load_data,
    load_example_weights,
    load_model,
    load_tokenizer,
    prepare_method,
    reference_cache_dir,
    resolve_model_dtype,
    wrap_model,
)
from .step import StepContext, TrainingDiverged, train_step

__all__ = ["TrainingInterrupted", "build_reference_cache", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (a KeyboardInterrupt) once train() has begun writing the run: `step` steps done
    of `total_steps`, the newest complete checkpoint (None: none yet, a rerun starts over) and
    run.resume (whether rerunning the same config continues from it). `fastnpo train` prints it
    in one line."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, resume: bool):
        super().__init__(step, total_steps, checkpoint, resume)
        self.step, self.total_steps, self.checkpoint, self.resume = step, total_steps, checkpoint, resume

    def __str__(self) -> str:
        where = f"last checkpoint {self.checkpoint}" if self.checkpoint is not None else "no checkpoint yet"
        return f"interrupted at step {self.step} of {self.total_steps} ({where})"


def train(config: Config, on_epoch_end=None, evaluator=None) -> dict:
    """Run the config. on_epoch_end(epoch, model) is called on rank 0 after each full epoch
    with the Hugging Face model (single process only: the demo evaluates there); a dict it
    returns is written to epochs.jsonl and returned under "epochs".
    evaluator(config, tokenizer) -> evaluation.EpochEvaluator: what eval.every_epoch
    evaluates with (any number of processes; see evaluation.py); required by it."""
    if config.eval.every_epoch and evaluator is None:
        raise ConfigError(
            "eval.every_epoch: this caller supplies no evaluator "
            "(train(config, evaluator=...); the TOFU one is built from eval.data)"
        )
    timeout_s = config.distributed.timeout_s
    info = distributed.setup(config.run.device, offload=config.optim.offload, timeout_s=timeout_s)
    try:
        return _train(config, info, on_epoch_end, evaluator)
    except RuntimeError as error:  # a collective past distributed.timeout_s: one line naming the rank
        distributed.raise_if_timeout(error, info, timeout_s)
        raise
    finally:
        distributed.teardown()


def _train(config: Config, info: distributed.ProcessInfo, on_epoch_end, evaluator=None) -> dict:
    log = console(info)
    check_model_sources(config)
    config = resolve_model_dtype(config, log)
    check_optimizer(config)
    check_offload(config, info, log)
    with OutputLock(config.run.output_dir, info, log):  # one run per output folder, before any write
        plan = prepare_output_dir(config, info, log)  # refuses before any work
        # config.yaml keeps the user's config; a resume on another world size trains with the
        # grad_accum that keeps the checkpoint's global batch.
        user_config, config = config, checkpoint.keep_global_batch(config, info, plan.resume_from, log)
        run = _build(config, info, plan.resume_from, log, evaluator)
        if on_epoch_end is not None and run.trainee.sharded:
            raise ConfigError("on_epoch_end needs the unsharded model: run in one process without optim.offload")
        # Every input is checked and loaded: only now may the old run (run.overwrite) make way.
        folder = OutputFolder(plan, info)
        folder.begin()
        try:
            write_run_files(plan.out, user_config, run.run_info, info)
            result = _steps(config, info, run, folder, on_epoch_end, log)
        except KeyboardInterrupt as interrupt:
            # This run's checkpoints: looked up before abandon() may put an old run back.
            steps = checkpoint.checkpoint_steps(plan.out / "checkpoints")
            newest = plan.out / "checkpoints" / f"step_{steps[-1]}" if steps else None
            folder.abandon()
            raise TrainingInterrupted(run.step, run.total_steps, newest, config.run.resume) from interrupt
        except BaseException:
            folder.abandon()
            raise
        mark_finished(plan.out, info)
        return result


@dataclass
class _Run:
    """What the steps need, built and checked before the output folder is touched."""

    method: object
    trainee: object
    tokenizer: object
    ref: object
    example_weights: object
    state: object  # what the method built once (Method.prepare)
    batches: object
    optimizer: object
    scheduler: object
    total_steps: int
    step: int  # the steps done: where the run starts, then (_steps) where it has got to
    run_info: dict
    evaluation: EpochEvaluation | None = None


def _build(config: Config, info: distributed.ProcessInfo, resume_from, log, evaluator=None) -> _Run:
    method = method_for(config.method.name)
    set_seed(config.run.seed)
    tokenizer = load_tokenizer(config)
    evaluation = None
    if config.eval.every_epoch:  # refuses bad evaluation input before any work
        evaluation = EpochEvaluation.build(config, info, evaluator, tokenizer, log)
        set_seed(config.run.seed)  # whatever the evaluator drew, the run starts from the seed
    micro_per_step = config.optim.grad_accum * info.world_size
    sets, batches = load_data(config, tokenizer, method, micro_per_step)  # raises on bad data, before any work
    example_weights = load_example_weights(config, sets["forget"])

    model = load_model(config, info.device)
    reference = frozen_reference(config, model) if method.live_reference else None
    ref, cache_hit = None, None
    if method.ref_sets:
        ref, cache_hit = cached_reference_logprobs(config, model, tokenizer, sets, method.ref_sets, info, log)
    state = prepare_method(config, method, model, sets["forget"], tokenizer.pad_token_id)  # before any wrapping
    if method.describe(state):
        log(method.describe(state))
    trainee = wrap_model(config, model, reference, info)
    steps_per_epoch = len(batches)
    if evaluation is not None:
        evaluation.prepare(trainee, lambda: load_model(config, "cpu"))
    optimizer, scheduler, total_steps = build_optimizer(config, trainee.parameters, steps_per_epoch)
    step = 0
    if resume_from is not None:
        resume_from, step = checkpoint.resume_run_state(
            resume_from,
            trainee.wrapper,
            optimizer,
            scheduler,
            batches,
            info,
            log,
            load_method=lambda saved: method.load_state_dict(state, saved),
        )
        log(f"resumed from {resume_from} at step {step}")
    if evaluation is not None:
        evaluation.resume(step, steps_per_epoch)
    run_info = {
        "reference_cache_hit": cache_hit,
        "world_size": info.world_size,
        "fsdp": trainee.sharded,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "resumed_from_step": step,
        "cache_key": ref.key if ref is not None else None,
    }
    return _Run(
        method,
        trainee,
        tokenizer,
        ref,
        example_weights,
        state,
        batches,
        optimizer,
        scheduler,
        total_steps,
        step,
        run_info,
        evaluation,
    )


def _steps(config: Config, info, run: _Run, folder: OutputFolder, on_epoch_end, log) -> dict:
    """The steps from run.step to the end, checkpoints, the export."""
    out, trainee, batches = Path(config.run.output_dir), run.trainee, run.batches
    optimizer, scheduler = run.optimizer, run.scheduler
    step, total_steps, steps_per_epoch = run.step, run.total_steps, len(batches)
    in_backward = StepInBackward(trainee.parameters, optimizer) if config.optim.in_backward else None
    context = StepContext(
        config,
        run.method,
        info,
        trainee,
        run.tokenizer,
        run.ref,
        run.example_weights,
        run.state,
        in_backward,
    )
    logger = RunLogger(
        config, info, run.method.sets, total_steps=total_steps, steps_per_epoch=steps_per_epoch, step=step
    )
    epoch_reports = []
    trainee.wrapper.train()
    while step < total_steps:
        started = time.perf_counter()
        reset_peak_memory(info.device)
        try:
            result = train_step(context, batches.next_items(), optimizer, scheduler)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"step {step + 1}: {error}") from None
        step += 1
        run.step = step  # for TrainingInterrupted
        logger.step(result, step=step, lr=float(scheduler.get_last_lr()[0]), started=started)
        if (on_epoch_end is not None or run.evaluation is not None) and step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            report = on_epoch_end(epoch, trainee.hf) if on_epoch_end is not None else None
            if run.evaluation is not None:
                report = {**(report or {}), **run.evaluation.epoch_end(epoch, trainee, run.tokenizer)}
            if report is not None:
                epoch_reports.append({"epoch": epoch, **report})
                logger.epoch(epoch_reports[-1])
            trainee.wrapper.train()
        if config.run.checkpoint_every and step % config.run.checkpoint_every == 0 and step < total_steps:
            checkpoint.save_run_state(
                out / "checkpoints",
                step,
                trainee.wrapper,
                optimizer,
                scheduler,
                batches,
                info,
                keep=config.run.keep_checkpoints,
                method_state=run.method.state_dict(run.state),
            )
            folder.commit()
    logger.close()
    if in_backward is not None:
        in_backward.remove()

    final = out / "final"
    if config.run.export:
        checkpoint.export_hf(trainee.wrapper, trainee.hf, run.tokenizer, final, info, lora=config.model.lora.enabled)
        log(f"exported {final}")
    distributed.barrier(info)
    folder.commit()
    return {
        "epochs": epoch_reports,
        "output_dir": str(out),
        "steps": step,
        "reference_cache_hit": run.run_info["reference_cache_hit"],
        "final": str(final) if config.run.export else None,
        **({"best": run.evaluation.best} if run.evaluation is not None and config.eval.keep_best else {}),
    }


def build_reference_cache(config: Config, verify: int = 0) -> dict:
    """`fastnpo cache-ref`: the reference pass alone (and optionally a recomputed sample)."""
    check_model_sources(config)
    info = distributed.setup(config.run.device, timeout_s=config.distributed.timeout_s)
    try:
        log = console(info)
        config = resolve_model_dtype(config, log)
        method = method_for(config.method.name)
        if not method.ref_sets:
            raise ConfigError(f"method {config.method.name} uses no cached reference log-probs")
        tokenizer = load_tokenizer(config)
        sets, _ = load_data(config, tokenizer, method, 1)
        model = load_model(config, info.device)
        ref, hit = cached_reference_logprobs(config, model, tokenizer, sets, method.ref_sets, info, log)
        stored = cache_path(reference_cache_dir(config), ref.key)
        if not stored.is_file():  # the trainer goes on with the computed values; storing them is this command's job
            raise OSError(f"the reference cache could not be stored as {stored} (the line above says why)")
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
    except RuntimeError as error:
        distributed.raise_if_timeout(error, info, config.distributed.timeout_s)
        raise
    finally:
        distributed.teardown()
