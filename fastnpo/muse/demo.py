"""The MUSE demo (`python -m fastnpo.muse.demo --out DIR`): fine-tune -> unlearn -> evaluate on
Mini-MUSE with a tiny model, offline, in a few minutes on 2 CPU cores.

0. write Mini-MUSE (minimuse.py), a tokenizer trained on it and a random tiny Llama (fastnpo.tiny);
1. train the target from the random model on trainer/target (general articles and QA, forget,
   retain1 and retain2 articles) and the retrained model on trainer/retrain (the same without the
   forget articles), same recipe and seed: MUSE's target and retrained models;
2. evaluate both (the retrained model's Min-K% AUC is privleak's reference);
3. unlearn the target's forget articles with every method through the trainer (retain set:
   retain1's articles), evaluating every `eval_every` epochs and after the last;
4. write results.json, results.md (the table) and muse_results.png (each number over the epochs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..console import library_bars_off
from ..files import OVERWRITE_OPTION, check_new_folder
from ..methods import METHODS, method_for
from ..tiny import TinyModelSpec, build_tiny_model, build_tokenizer
from ..tofu.demo import environment
from ..tofu.privacy import PRIVLEAK_ATTACK, privleak
from ..train import load_config, train
from .evaluate import MuseEvalConfig, evaluate_muse, summary
from .minimuse import TEMPLATE, generate_minimuse, tokenizer_texts, write_minimuse

DEFAULT_METHODS = ("ga", "npo", "npo_rt", "simnpo")
# The numbers of the table and the figure, in MUSE's order, with what "better" means after unlearning.
COLUMNS = {
    "forget_verbmem_ROUGE": "VerbMem forget (lower)",
    "forget_knowmem_ROUGE": "KnowMem forget (lower)",
    "retain_knowmem_ROUGE": "KnowMem retain (higher)",
    "privleak": "PrivLeak (closer to 0)",
    "extraction_strength": "extraction strength (lower)",
}


@dataclass
class MuseDemoPreset:
    """Sizes and recipe. threads: torch CPU threads for the whole demo (fixed: the numbers depend on
    the summation order, as in the TOFU demo)."""

    num_forget: int = 8
    num_retain: int = 8
    num_holdout: int = 8
    num_general: int = 32
    num_icl: int = 3
    vocab_size: int = 1024
    model: TinyModelSpec = field(default_factory=lambda: TinyModelSpec(hidden_size=96, intermediate_size=256))
    max_length: int = 192
    finetune_epochs: float = 40
    finetune_lr: float = 3e-3
    batch_size: int = 16
    unlearn_epochs: float = 6
    unlearn_lr: float = 3e-4
    unlearn_batch_size: int = 4
    methods: tuple[str, ...] = DEFAULT_METHODS
    eval_every: int = 2
    knowmem_max_new_tokens: int = 32
    verbmem_max_new_tokens: int = 128
    threads: int = 1


PRESETS = {
    "default": MuseDemoPreset(),
    # A smoke run: seconds, every stage, numbers that say nothing.
    "tiny": MuseDemoPreset(
        num_forget=2,
        num_retain=2,
        num_holdout=2,
        num_general=4,
        num_icl=1,
        vocab_size=400,
        model=TinyModelSpec(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1),
        max_length=256,
        finetune_epochs=1,
        unlearn_epochs=1,
        methods=("ga", "npo"),
        eval_every=1,
        knowmem_max_new_tokens=4,
        verbmem_max_new_tokens=4,
    ),
}
ENTRIES = {
    "data",
    "base",
    "target",
    "retrain",
    "unlearn",
    "ref-cache",
    "results.json",
    "results.md",
    "muse_results.png",
}


def _train_config(overrides: list[str], preset: MuseDemoPreset, out: Path, seed: int):
    return load_config(
        None,
        [
            "model.dtype=float32",
            "data.template='{question}'",
            'data.answer_prefix=""',
            f"data.max_length={preset.max_length}",
            f"run.output_dir={out}",
            "run.overwrite=true",
            "run.progress=false",
            "run.log_every=0",
            f"data.seed={seed}",
            f"run.seed={seed}",
            *overrides,
        ],
    )


def _finetune(base: Path, data: Path, split: str, out: Path, preset: MuseDemoPreset, seed: int) -> Path:
    config = _train_config(
        [
            f"model.name_or_path={base}",
            f"data.forget={data / 'trainer'}",
            f"data.forget_split={split}",
            f"data.batch_size={preset.batch_size}",
            "method.name=finetune",
            f"optim.lr={preset.finetune_lr}",
            f"optim.epochs={preset.finetune_epochs}",
            "optim.warmup_epochs=1",
            "optim.weight_decay=0",
        ],
        preset,
        out,
        seed,
    )
    return Path(train(config)["final"])


def _unlearn(
    target: Path, data: Path, method: str, out: Path, preset: MuseDemoPreset, seed: int, evaluate
) -> list[dict]:
    changes = method_for(method).for_layers(preset.model.num_hidden_layers)
    config = _train_config(
        [
            f"model.name_or_path={target}",
            f"data.forget={data / 'trainer'}",
            "data.forget_split=forget",
            f"data.retain={data / 'trainer'}",
            "data.retain_split=retain",
            f"data.batch_size={preset.unlearn_batch_size}",
            f"data.retain_batch_size={preset.unlearn_batch_size}",
            f"method.name={method}",
            f"optim.lr={preset.unlearn_lr}",
            f"optim.epochs={preset.unlearn_epochs}",
            "optim.warmup_epochs=1",
            f"run.cache_dir={out.parent / 'ref-cache'}",
            "run.export=false",
            *[f"method.{k}={v}" for k, v in changes.items()],
        ],
        preset,
        out / method,
        seed,
    )
    return train(config, on_epoch_end=evaluate)["epochs"]


def results_table(results: dict) -> str:
    """Markdown: target, retrained model and each method's last evaluated epoch."""
    header = "| model | " + " | ".join(COLUMNS.values()) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]

    def row(name, numbers):
        cells = []
        for key in COLUMNS:
            value = numbers.get(key)
            cells.append("—" if value is None else (f"{value:.1f}" if key == "privleak" else f"{value:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row("target (before unlearning)", results["target"])
    row("retrained (never saw forget)", results["retrain"])
    for method, epochs in results["runs"].items():
        row(f"{method_for(method).label} (epoch {epochs[-1]['epoch']:g})", epochs[-1])
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> None:
    """One panel per number: each method over the epochs (epoch 0: the target), the retrained model
    as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.6))
    for ax, (key, label) in zip(axes, COLUMNS.items(), strict=True):
        for k, (method, epochs) in enumerate(results["runs"].items()):
            xs = [e["epoch"] for e in epochs if e.get(key) is not None]
            ys = [e[key] for e in epochs if e.get(key) is not None]
            ax.plot(xs, ys, marker="o", color=f"C{k}", label=method_for(method).label)
        if results["retrain"].get(key) is not None:
            ax.axhline(results["retrain"][key], color="gray", linestyle="--", label="retrained")
        ax.set_title(label)
        ax.set_xlabel("unlearning epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Mini-MUSE: unlearning the forget articles (epoch 0 = target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prepare_out(out: Path, overwrite: bool) -> None:
    check_new_folder(out, name="--out", overwrite=overwrite, how_to_overwrite=OVERWRITE_OPTION)
    if out.is_dir():
        import shutil

        for entry in out.iterdir():
            if entry.name in ENTRIES:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def run_muse_demo(
    out_dir: str | Path = "runs/muse_demo",
    preset: str | MuseDemoPreset = "default",
    seed: int = 0,
    log=print,
    *,
    methods=None,
    overwrite: bool = False,
) -> dict:
    """The stages of the module docstring; returns (and writes) the results."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset_name, preset = preset, PRESETS[preset]
    elif isinstance(preset, MuseDemoPreset):
        preset_name = "custom"
    else:
        raise ValueError(f"preset must be a preset name or a MuseDemoPreset, got {type(preset).__name__}")
    if methods is not None:
        unlearning = [name for name, m in METHODS.items() if m.unlearns]
        if isinstance(methods, str) or not methods or any(m not in unlearning for m in methods):
            raise ValueError(f"methods must be a non-empty list of {unlearning}, got {methods!r}")
        preset = replace(preset, methods=tuple(methods))
    if type(seed) is not int or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(preset.threads)
    try:
        with library_bars_off():
            results = _run(out, preset, seed, log)
    finally:
        torch.set_num_threads(threads)
    results = {"preset": preset_name, **results, "environment": environment(preset.threads)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    plot_results(results, out / "muse_results.png")
    log(table)
    log(f"[muse demo] wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'muse_results.png'}")
    return results


def _run(out: Path, preset: MuseDemoPreset, seed: int, log) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings, started = {}, time.perf_counter()

    def done(stage):
        timings[stage] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log(f"[muse demo] {stage} done ({timings[stage]:.0f} s)")

    sizes = {k: getattr(preset, k) for k in ("num_forget", "num_retain", "num_holdout", "num_general", "num_icl")}
    data = write_minimuse(out / "data", seed, **sizes)
    # "Question: " and "Answer: " stay whole tokens: the few-shot prompt ends in "Answer: ", and a
    # byte-level BPE would otherwise see the answer's first word as " word" in the fact sheets but as
    # " " + "word" after the prompt.
    tokenizer = build_tokenizer(
        tokenizer_texts(generate_minimuse(seed, **sizes)),
        vocab_size=preset.vocab_size,
        extra_tokens=(TEMPLATE["user_start"], TEMPLATE["asst_start"]),
    )
    base = out / "base"
    build_tiny_model(tokenizer, preset.model, seed).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    done("prepare")
    target = _finetune(base, data, "target", out / "target", preset, seed)
    retrain = _finetune(base, data, "retrain", out / "retrain", preset, seed)
    done("fine-tune target and retrained model")
    eval_config = MuseEvalConfig(
        knowmem_max_new_tokens=preset.knowmem_max_new_tokens,
        verbmem_max_new_tokens=preset.verbmem_max_new_tokens,
        progress=False,
    )
    from .data import load_muse

    muse = load_muse(data)
    tokenizer = AutoTokenizer.from_pretrained(target)
    with warnings.catch_warnings():  # its privleak is against itself (0 by definition), not against 0.5
        warnings.simplefilter("ignore")
        retrain_report = evaluate_muse(AutoModelForCausalLM.from_pretrained(retrain), tokenizer, muse, eval_config)
    auc = retrain_report[PRIVLEAK_ATTACK]
    retrain_report.update(retain_auc=auc, privleak=privleak(auc, auc))
    target_report = evaluate_muse(
        AutoModelForCausalLM.from_pretrained(target), tokenizer, muse, eval_config, retain_report=retrain_report
    )
    log(f"[muse demo] target: {_line(summary(target_report))}")
    log(f"[muse demo] retrained: {_line(summary(retrain_report))}")
    done("evaluate target and retrained model")
    last = int(preset.unlearn_epochs)

    def evaluate(epoch, model):
        if epoch % preset.eval_every and epoch != last:
            return None
        return summary(evaluate_muse(model, tokenizer, muse, eval_config, retain_report=retrain_report))

    runs = {}
    for method in preset.methods:
        epochs = _unlearn(target, data, method, out / "unlearn", preset, seed, evaluate)
        runs[method] = [{"epoch": 0, **summary(target_report)}, *epochs]
        log(f"[muse demo] {method_for(method).label}: {_line(runs[method][-1])}")
        done(f"unlearn {method}")
    return {
        "settings": asdict(preset),
        "seed": seed,
        "timings_s": timings,
        "target": summary(target_report),
        "retrain": summary(retrain_report),
        "examples": {
            name: {k: report["details"][k][:3] for k in ("forget_knowmem", "retain_knowmem", "forget_verbmem")}
            for name, report in (("target", target_report), ("retrain", retrain_report))
        },
        "runs": runs,
    }


def _line(numbers: dict) -> str:
    return ", ".join(f"{k} {numbers[k]:.3g}" for k in COLUMNS if numbers.get(k) is not None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastnpo.muse.demo", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("--out", default="runs/muse_demo", help="output folder (default runs/muse_demo)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier demo wrote in --out")
    args = parser.parse_args(argv)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        run_muse_demo(args.out, args.preset, args.seed, methods=methods, overwrite=args.overwrite)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
