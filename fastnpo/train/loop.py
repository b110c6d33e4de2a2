"""The unlearning run top to bottom (train), and the reference pass alone (build_reference_cache,
`fastnpo cache-ref`).

1. check the output folder and the data before any work (output.py);
2. Trainer.build (trainer.py): load the model; the reference log-probs: one pass of the initial
   model over every example a loss needs, cached on disk by content (refcache/); no reference
   model is kept afterwards (except the frozen copy of a method that needs the reference's full
   distribution); what the method builds once (Method.prepare, setup.prepare_method: e.g. frozen
   layers, or the reference's final hidden states of the forget answer tokens) is built from the
   initial model; wrap (LoRA, activation checkpointing, FSDP2), optimizer, schedule, resume;
3. the steps (Trainer.step, step.py), logged (logging.py) and checkpointed every
   run.checkpoint_every steps; with eval.every_epoch, an evaluation after each epoch and the best
   epoch kept (evaluation.py);
4. a final Hugging Face export.
"""

import time
from pathlib import Path

from .. import distributed
from ..methods import method_for
from ..modeling import SequenceLogprobModel
from ..profiling import reset_peak_memory
from ..refcache import cache_path, item_logprobs
from . import checkpoint
from .config import Config, ConfigError
from .logging import RunLogger, console, mark_finished, write_run_files
from .output import OutputFolder, OutputLock, prepare_output_dir
from .setup import (
    cached_reference_logprobs,
    check_model_sources,
    check_offload,
    check_optimizer,
    load_data,
    load_model,
    load_tokenizer,
    reference_cache_dir,
    resolve_model_dtype,
)
from .trainer import Trainer

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
        trainer = Trainer.build(config, info, resume_from=plan.resume_from, evaluator=evaluator, log=log)
        if on_epoch_end is not None and trainer.model.sharded:
            raise ConfigError("on_epoch_end needs the unsharded model: run in one process without optim.offload")
        # Every input is checked and loaded: only now may the old run (run.overwrite) make way.
        folder = OutputFolder(plan, info)
        folder.begin()
        try:
            write_run_files(plan.out, user_config, trainer.run_info, info)
            epoch_reports = _steps(trainer, folder, on_epoch_end)
            result = _finish(trainer, folder, epoch_reports, log)
        except KeyboardInterrupt as interrupt:
            # This run's checkpoints: looked up before abandon() may put an old run back.
            steps = checkpoint.checkpoint_steps(plan.out / "checkpoints")
            newest = plan.out / "checkpoints" / f"step_{steps[-1]}" if steps else None
            folder.abandon()
            raise TrainingInterrupted(trainer.steps_done, trainer.total_steps, newest, config.run.resume) from interrupt
        except BaseException:
            folder.abandon()
            raise
        mark_finished(plan.out, info)
        return result


def _steps(trainer: Trainer, folder: OutputFolder, on_epoch_end) -> list[dict]:
    """The steps from where the trainer is to the end, logged; the epoch reports; a checkpoint
    every run.checkpoint_every steps (not after the last: the export follows)."""
    config, info = trainer.config, trainer.info
    steps_per_epoch = len(trainer.batches)
    logger = RunLogger(
        config,
        info,
        trainer.method.sets,
        total_steps=trainer.total_steps,
        steps_per_epoch=steps_per_epoch,
        step=trainer.steps_done,
    )
    epoch_reports = []
    trainer.model.wrapper.train()
    while trainer.steps_done < trainer.total_steps:
        started = time.perf_counter()
        reset_peak_memory(info.device)
        result = trainer.step(trainer.batches.next_items())
        step = trainer.steps_done
        logger.step(result, step=step, lr=trainer.lr, started=started)
        if (on_epoch_end is not None or trainer.evaluation is not None) and step % steps_per_epoch == 0:
            report = _epoch_report(trainer, step // steps_per_epoch, on_epoch_end)
            if report is not None:
                epoch_reports.append(report)
                logger.epoch(report)
            trainer.model.wrapper.train()
        if config.run.checkpoint_every and step % config.run.checkpoint_every == 0 and step < trainer.total_steps:
            trainer.save_checkpoint(Path(config.run.output_dir) / "checkpoints", keep=config.run.keep_checkpoints)
            folder.commit()
    logger.close()
    trainer.close()
    return epoch_reports


def _epoch_report(trainer: Trainer, epoch: int, on_epoch_end) -> dict | None:
    """on_epoch_end's report and the evaluation's (eval.every_epoch), merged; None without either."""
    report = on_epoch_end(epoch, trainer.model.hf) if on_epoch_end is not None else None
    if trainer.evaluation is not None:
        report = {**(report or {}), **trainer.evaluation.epoch_end(epoch, trainer.model, trainer.tokenizer)}
    return {"epoch": epoch, **report} if report is not None else None


def _finish(trainer: Trainer, folder: OutputFolder, epoch_reports: list[dict], log) -> dict:
    """The export (run.export), then train()'s summary."""
    config, out = trainer.config, Path(trainer.config.run.output_dir)
    final = out / "final"
    if config.run.export:
        trainer.export(final)
        log(f"exported {final}")
    distributed.barrier(trainer.info)
    folder.commit()
    evaluation = trainer.evaluation
    return {
        "epochs": epoch_reports,
        "output_dir": str(out),
        "steps": trainer.steps_done,
        "reference_cache_hit": trainer.run_info["reference_cache_hit"],
        "final": str(final) if config.run.export else None,
        **({"best": evaluation.best} if evaluation is not None and config.eval.keep_best else {}),
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
