"""What a run reports: config.yaml and run_info.json beside the run, one metrics.jsonl record
per step (also to TensorBoard), the progress bar, a console line every run.log_every steps, and
the per-epoch reports (on_epoch_end, eval.every_epoch) in epochs.jsonl. Only rank 0 writes;
the statistics come summed over ranks (StepResult.collect)."""

import json
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..distributed import ProcessInfo
from ..files import atomic_write
from ..profiling import peak_memory_bytes
from .config import Config, to_yaml
from .step import StepResult


def console(info: ProcessInfo) -> Callable[[str], None]:
    """print on rank 0 through tqdm.write, so lines do not break the progress bar; a no-op elsewhere."""
    return tqdm.write if info.is_main else (lambda message: None)


def write_run_files(out: Path, config: Config, run_info: dict, info: ProcessInfo) -> None:
    """config.yaml and run_info.json, marked unfinished until mark_finished."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(config))
        (out / "run_info.json").write_text(json.dumps({**run_info, "finished": False}, indent=1))


def mark_finished(out: Path, info: ProcessInfo) -> None:
    """Record the end of the run in run_info.json: a finished run is refused, never resumed."""
    if info.is_main:
        path = out / "run_info.json"
        run_info = json.loads(path.read_text())
        atomic_write(path, json.dumps({**run_info, "finished": True}, indent=1).encode())


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep the records `keep` accepts (and drop a line cut short by a kill); a resumed run
    would otherwise log the steps past its checkpoint a second time."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line + "\n")
    atomic_write(path, "".join(kept).encode())


class RunLogger:
    """metrics.jsonl, TensorBoard, the progress bar and the per-step console line."""

    def __init__(self, config: Config, info: ProcessInfo, sets, *, total_steps: int, steps_per_epoch: int, step: int):
        self.out = Path(config.run.output_dir)
        self.log_every = config.run.log_every
        self.sets = sets
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.info = info
        self.main = info.is_main
        self.log = console(info)
        self.writer = None
        if config.run.tensorboard and info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if info.is_main:
            # Restarted at `step` (a resume, or 0): the records of steps after it are the
            # previous attempt's, and the steps will be logged again.
            truncate_jsonl(self.out / "metrics.jsonl", lambda record: record.get("step", 0) <= step)
            truncate_jsonl(self.out / "epochs.jsonl", lambda report: report.get("epoch", 0) * steps_per_epoch <= step)
        self.metrics = open(self.out / "metrics.jsonl", "a") if info.is_main else None
        self.bar = tqdm(
            total=total_steps,
            initial=step,
            desc=f"{config.method.name}",
            disable=not (config.run.progress and info.is_main),
        )

    def step(self, result: StepResult, *, step: int, lr: float, started: float) -> None:
        """Log step `step` (every rank calls it: the record takes an all-reduce)."""
        record = self.record(result, step=step, lr=lr, started=started)
        if self.main:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.writer is not None:
                for key, value in record.items():
                    if key != "step":
                        self.writer.add_scalar(key, value, step)
            if self.log_every and (step % self.log_every == 0 or step == self.total_steps):
                shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "epoch"))
                self.log(f"step {step}/{self.total_steps} epoch {record['epoch']:.2f} {shown}")
        self.bar.update(1)

    def record(self, result: StepResult, *, step: int, lr: float, started: float) -> dict:
        """The step's metrics.jsonl record: loss terms, mean log-probs and tokens (summed over
        ranks by StepResult.collect), grad norm, lr, throughput since `started`, peak memory."""
        elapsed = time.perf_counter() - started
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4)}
        keys = sorted(result.term_totals)
        record.update({k: result.term_totals[k] for k in keys})
        record["loss"] = sum(result.term_totals[k] * result.coeffs[k] for k in keys)
        for name in self.sets:
            record[f"mean_{name}_logp"] = result.logp_sums[name] / max(1, result.global_counts[f"{name}_examples"])
        record.update(
            {
                "grad_norm": result.grad_norm,
                "lr": lr,
                "tokens_per_s": result.tokens / elapsed,
                "peak_memory_mib": peak_memory_bytes(self.info.device) / 2**20,
            }
        )
        return record

    def epoch(self, report: dict) -> None:
        """One epochs.jsonl line (every rank may call it; rank 0 writes)."""
        if not self.main:
            return
        with open(self.out / "epochs.jsonl", "a") as epochs_file:
            epochs_file.write(json.dumps(report) + "\n")

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
