"""`fastnpo demo`: the TOFU unlearning study, end to end, on Mini-TOFU and a tiny model.

0. write Mini-TOFU, its tokenizer and a random tiny Llama (tiny.py);
1. "pre-train" it on the real-authors and world-facts sets: the general knowledge that
   model utility checks and that unlearning should leave alone;
2. fine-tune the target on `full`, and a retain model on each retain split (TOFU's recipe:
   same start, same steps, the forget authors left out);
3. evaluate target and retain models: forget quality of the target against the retain
   model shows how much there is to forget before any unlearning; privleak (the Min-K% attack's
   AUC on the forget split vs its holdout split) is relative to the same retain model's AUC;
4. unlearn every forget split with every method through the trainer (cached reference
   log-probs), once per unlearning seed (data order), evaluating every `eval_every` epochs;
5. print the table (median and range over the unlearning seeds) and write results.json, with
   the environment the numbers depend on, and the plots.

Steps 0-3 run once (seed `seed`); only step 4 repeats per seed: it is where the methods differ,
and repeating the fine-tuning would not fit the 10-minute budget on 2 CPU cores.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import torch

from ..console import library_bars_off
from ..files import OVERWRITE_OPTION, check_new_folder
from ..methods import BASELINES, METHODS, method_for
from ..tiny import TinyModelSpec
from ..train import load_config, train
from .evaluate import EvalConfig, Evaluator, add_forget_quality, add_privleak, summary
from .minitofu import prepare_tiny
from .plots import plot_results, results_table

SPLIT_PAIRS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# The default preset's methods. The other unlearning methods would take `make demo` past 10 minutes
# on 2 cores (~3 s per method, split and seed: +4 min); the full preset runs every method.
DEFAULT_METHODS = BASELINES
# Every method that unlearns on what Mini-TOFU holds (forget, retain, refusals), in the registry's
# (the tables' and plots') order: AltPO's alternate answers are not part of it.
DEMO_SETS = {"forget", "retain", "idk"}
UNLEARNING_METHODS = tuple(
    name for name, method in METHODS.items() if method.unlearns and set(method.sets) <= DEMO_SETS
)


@dataclass
class DemoPreset:
    """Sizes and recipe. 40 authors x 8 QA: forget01 / 05 / 10 = 1 / 2 / 4 authors = 8 / 16 / 32
    questions, enough for the KS test to separate a memorised set (8 vs 8 fully separated: p ~ 2e-4).
    30 epochs at lr 3e-3 memorise `full` (answer NLL ~0.03 / token) on this model.

    threads: torch CPU threads for the whole demo. The numbers depend on it (the summation order
    of every matmul changes with the thread count, and 30 epochs at lr 3e-3 amplify the last-bit
    differences into other models), so it is fixed rather than left to the machine's core count.
    One thread costs little for a model this small and is much faster on a busy machine (the
    pre-training stage: 4 s with 1 thread vs 3.3 s with 2 on an idle 2-core machine; 7 s vs 70 s
    while other jobs ran)."""

    num_authors: int = 40
    qa_per_author: int = 8
    model: TinyModelSpec = field(default_factory=TinyModelSpec)
    pretrain_epochs: float = 30
    finetune_epochs: float = 30
    finetune_lr: float = 3e-3
    batch_size: int = 16
    unlearn_epochs: float = 8
    unlearn_lr: float = 1e-3
    unlearn_batch_size: int = 4
    beta: float | None = None  # method.beta; None: each method's default
    methods: tuple[str, ...] = DEFAULT_METHODS
    splits: tuple[str, ...] = tuple(SPLIT_PAIRS)
    max_new_tokens: int = 24
    unlearn_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    eval_every: int = 2
    threads: int = 1


PRESETS = {
    # Seconds, and still numbers that move (the committed quick table is compared with them).
    "quick": DemoPreset(
        num_authors=20,
        qa_per_author=4,
        model=TinyModelSpec(hidden_size=32, intermediate_size=64),
        pretrain_epochs=8,
        finetune_epochs=12,
        unlearn_epochs=2,
        methods=("ga", "npo", "npo_rt"),
        splits=("forget10",),
        max_new_tokens=8,
        unlearn_seeds=(0, 1),
        eval_every=1,
    ),
    "default": DemoPreset(),
    "full": DemoPreset(
        num_authors=100,
        model=TinyModelSpec(hidden_size=128, intermediate_size=352),
        pretrain_epochs=40,
        finetune_epochs=60,
        unlearn_epochs=10,
        methods=UNLEARNING_METHODS,
    ),
}


def _write_pretrain_split(data_dir: Path) -> None:
    """real_authors + world_facts as one QA split: the tiny model's "pre-training" data."""
    rows = []
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        for line in (data_dir / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append({"question": row["question"], "answer": row["answer"]})
    (data_dir / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _finetune(model: Path, data: Path, split: str, out: Path, preset: DemoPreset, epochs: float, seed: int) -> Path:
    config = load_config(
        None,
        [
            f"model.name_or_path={model}",
            "model.dtype=float32",  # the tiny model's own; said once here rather than logged by every run
            f"data.forget={data}",
            f"data.forget_split={split}",
            f"data.batch_size={preset.batch_size}",
            "data.max_length=96",
            "method.name=finetune",
            f"optim.lr={preset.finetune_lr}",
            f"optim.epochs={epochs}",
            "optim.warmup_epochs=1",
            "optim.weight_decay=0",
            f"run.output_dir={out}",
            "run.overwrite=true",
            "run.progress=false",
            "run.log_every=0",
            f"data.seed={seed}",
            f"run.seed={seed}",
        ],
    )
    return Path(train(config)["final"])


class _Stopwatch:
    """Seconds spent in each stage since the previous one ended: wall clock, and this process's
    CPU time (which, with one thread, is what the stage takes on an otherwise idle machine)."""

    def __init__(self, log):
        self.log, self.timings, self.cpu = log, {}, {}
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def done(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.started - sum(self.timings.values()), 1)
        self.cpu[name] = round(time.process_time() - self.cpu_started - sum(self.cpu.values()), 1)
        self.log(f"[demo] {name} done ({self.timings[name]:.0f} s, CPU {self.cpu[name]:.0f} s)")


def _resolve_preset(preset: str | DemoPreset) -> tuple[str, DemoPreset]:
    if not isinstance(preset, str):
        return "custom", preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return preset, PRESETS[preset]


def _finetune_models(
    pretrained: Path, data: Path, out: Path, preset: DemoPreset, seed: int
) -> tuple[Path, dict[str, Path]]:
    """The target (fine-tuned on `full`) and one retain model per forget split, from the same start."""
    target = _finetune(pretrained, data, "full", out / "target", preset, preset.finetune_epochs, seed)
    retain_models = {
        split: _finetune(
            pretrained,
            data,
            SPLIT_PAIRS[split],
            out / SPLIT_PAIRS[split],
            preset,
            preset.finetune_epochs,
            seed,
        )
        for split in preset.splits
    }
    return target, retain_models


def _evaluate_before(target: Path, retain_models: dict[str, Path], data: Path, preset: DemoPreset, log):
    """Evaluators per split, and the reports of the retain models and of the target before unlearning.
    Forget quality and privleak are against the split's retain model (its own: 1 and 0); privleak's
    holdout split is the forget split's (EvalConfig's default: forget05 -> holdout05)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    evaluators = {
        split: Evaluator(
            EvalConfig(data=str(data), forget_split=split, max_new_tokens=preset.max_new_tokens), tokenizer
        )
        for split in preset.splits
    }
    retain_reports, target_reports = {}, {}
    for split in preset.splits:
        retain_reports[split] = evaluators[split].evaluate(AutoModelForCausalLM.from_pretrained(retain_models[split]))
        _against_retain(retain_reports[split], retain_reports[split])
        target_reports[split] = _against_retain(
            evaluators[split].evaluate(AutoModelForCausalLM.from_pretrained(target)), retain_reports[split]
        )
        log(
            f"[demo] {split}: target forget quality {target_reports[split]['forget_quality']:.3g} "
            f"(retain model 1.0), model utility {target_reports[split]['model_utility']:.3f}"
        )
    return evaluators, retain_reports, target_reports


def _against_retain(report: dict, retain_report: dict) -> dict:
    """Forget quality and privleak of a report against the split's retain model."""
    return add_privleak(add_forget_quality(report, retain_report), retain_report)


def _unlearn_config(target: Path, data: Path, split: str, method: str, out: Path, preset: DemoPreset, seed: int):
    return load_config(
        None,
        [
            f"model.name_or_path={target}",
            "model.dtype=float32",
            f"data.forget={data}",
            f"data.forget_split={split}",
            f"data.retain={data}",
            f"data.retain_split={SPLIT_PAIRS[split]}",
            "data.max_length=96",
            f"data.batch_size={preset.unlearn_batch_size}",
            f"data.retain_batch_size={preset.unlearn_batch_size}",
            f"method.name={method}",
            *([f"method.beta={preset.beta}"] if preset.beta is not None else []),
            f"optim.lr={preset.unlearn_lr}",
            f"optim.epochs={preset.unlearn_epochs}",
            "optim.warmup_epochs=1",
            f"run.output_dir={out / 'unlearn' / f'seed{seed}' / split / method}",
            # One cache for every seed and method: the reference pass depends on the target and
            # the data only, so only the first run of a split computes it.
            f"run.cache_dir={out / 'ref-cache'}",
            "run.overwrite=true",
            "run.export=false",
            "run.progress=false",
            "run.log_every=0",
            # data.seed draws the batch order (fastnpo.data.batching); run.seed the torch RNG.
            f"data.seed={seed}",
            f"run.seed={seed}",
            *_method_overrides(method, preset),
        ],
    )


def _method_overrides(method: str, preset: DemoPreset) -> list[str]:
    """What the method changes for a model this shallow (Method.for_layers)."""
    changes = method_for(method).for_layers(preset.model.num_hidden_layers)
    return [f"method.{key}={_override_value(value)}" for key, value in changes.items()]


def _override_value(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)


def _unlearn_split(
    split: str, target: Path, data: Path, out: Path, preset: DemoPreset, seed: int, reports: dict, log
) -> dict[str, list[dict]]:
    """Every method on one forget split, evaluated every preset.eval_every epochs and after the
    last; epoch 0 is the target.

    reports: the split's evaluator and the retain / target reports (from _evaluate_before).
    """
    evaluator, retain_report = reports["evaluator"], reports["retain"]
    last_epoch = int(preset.unlearn_epochs)

    def evaluate(epoch, model):
        # Evaluation (greedy generation on four sets) costs more than an epoch of unlearning.
        if epoch % preset.eval_every and epoch != last_epoch:
            return None
        return summary(_against_retain(evaluator.evaluate(model), retain_report))

    before = summary(reports["target"])
    runs = {}
    for method in preset.methods:
        result = train(_unlearn_config(target, data, split, method, out, preset, seed), on_epoch_end=evaluate)
        runs[method] = [{"epoch": 0, **before}, *result["epochs"]]
        last = runs[method][-1]
        log(
            f"[demo] seed {seed} {split} {method_for(method).label:8s} forget quality {last['forget_quality']:.3g} "
            f"model utility {last['model_utility']:.3f}"
        )
    return runs


def environment(threads: int) -> dict:
    """What the numbers depend on besides the code and the preset: versions, threads, BLAS, CPU."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "tokenizers", "datasets", "numpy", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    config = torch.__config__.show()
    build = dict(re.findall(r"(\w+)=([^,\s]*)", config))  # "Build settings: BLAS_INFO=mkl, ..."
    return {
        "versions": versions,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": build.get("BLAS_INFO"),
        "lapack": build.get("LAPACK_INFO"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "torch_config": config,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """HEAD of the checkout this package runs from, "+dirty" when tracked files differ from it."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """The policy of every command that writes a folder (files.check_new_folder, which `fastnpo
    demo` also applies before its imports): a file or an unwritable folder is refused, a non-empty
    one unless overwrite; overwrite removes only what a demo writes there."""
    check_new_folder(out, name="--out", overwrite=overwrite, how_to_overwrite=OVERWRITE_OPTION)
    if not (out.is_dir() and any(out.iterdir())):
        return
    for entry in out.iterdir():
        if entry.name in DEMO_ENTRIES or entry.name.startswith("retain"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


DEMO_ENTRIES = {
    "setup",
    "pretrained",
    "target",
    "unlearn",
    "ref-cache",
    "results.json",
    "results.md",
    "forget_quality_vs_utility.png",
    "memorisation.png",
}


def run_demo(
    out_dir: str | Path = "runs/demo",
    preset: str | DemoPreset = "default",
    seed: int = 0,
    log=print,
    *,
    unlearn_seeds=None,
    methods=None,
    overwrite: bool = False,
) -> dict:
    """Run the stages of the module docstring in order and return (and write) the results
    (methods: the unlearning methods instead of the preset's)."""
    preset_name, preset = _resolve_preset(preset)
    if methods is not None:
        unknown = [m for m in methods if m not in UNLEARNING_METHODS]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty list of {list(UNLEARNING_METHODS)}, got {list(methods)!r}")
        preset = replace(preset, methods=tuple(methods))
    seeds = tuple(preset.unlearn_seeds if unlearn_seeds is None else unlearn_seeds)
    if not seeds:
        raise ValueError("unlearn_seeds must name at least one seed")
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(preset.threads)
    try:
        with library_bars_off():
            results = _run(out, preset, seed, seeds, log)
    finally:
        torch.set_num_threads(threads)
    results = {"preset": preset_name, **results, "environment": environment(preset.threads)}
    _write_results(results, out, log)
    return results


def _run(out: Path, preset: DemoPreset, seed: int, seeds: tuple[int, ...], log) -> dict:
    stopwatch = _Stopwatch(log)
    paths = prepare_tiny(
        out / "setup", seed=seed, num_authors=preset.num_authors, qa_per_author=preset.qa_per_author, spec=preset.model
    )
    data = paths["data"]
    _write_pretrain_split(data)
    stopwatch.done("prepare")
    pretrained = _finetune(paths["base"], data, "pretrain", out / "pretrained", preset, preset.pretrain_epochs, seed)
    stopwatch.done("pretrain")
    target, retain_models = _finetune_models(pretrained, data, out, preset, seed)
    stopwatch.done("finetune")
    evaluators, retain_reports, target_reports = _evaluate_before(target, retain_models, data, preset, log)
    stopwatch.done("evaluate target and retain models")
    runs = {}
    for unlearn_seed in seeds:
        runs[str(unlearn_seed)] = {}
        for split in preset.splits:
            reports = {"evaluator": evaluators[split], "retain": retain_reports[split], "target": target_reports[split]}
            runs[str(unlearn_seed)][split] = _unlearn_split(
                split, target, data, out, preset, unlearn_seed, reports, log
            )
        stopwatch.done(f"unlearn, seed {unlearn_seed}")
    return {
        "settings": {**asdict(preset), "unlearn_seeds": list(seeds)},
        "seed": seed,
        "unlearn_seeds": list(seeds),
        "timings_s": stopwatch.timings,
        "cpu_s": stopwatch.cpu,
        "target": {s: summary(r) for s, r in target_reports.items()},
        "retain_models": {s: summary(r) for s, r in retain_reports.items()},
        "memorisation": {
            s: {
                "target": target_reports[s]["forget"]["truth_ratios"],
                "retain": retain_reports[s]["forget"]["truth_ratios"],
            }
            for s in preset.splits
        },
        "runs": runs,
    }


def _write_results(results: dict, out: Path, log) -> None:
    """results.json, results.md (also logged) and the two figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    log(table)
    plot_results(results, out)
    log(
        f"[demo] wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'forget_quality_vs_utility.png'}, "
        f"{out / 'memorisation.png'}"
    )
