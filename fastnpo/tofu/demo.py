"""`fastnpo demo`: the TOFU unlearning study, end to end, on Mini-TOFU and a tiny model.

0. write Mini-TOFU, its tokenizer and a random tiny Llama (tiny.py);
1. "pre-train" it on the real-authors and world-facts sets: the general knowledge that
   model utility checks and that unlearning should leave alone;
2. fine-tune the target on `full`, and a retain model on each retain split (TOFU's recipe:
   same start, same steps, the forget authors left out);
3. evaluate target and retain models: forget quality of the target against the retain
   model shows how much there is to forget before any unlearning;
4. unlearn every forget split with every method through the trainer (cached reference
   log-probs), evaluating after every epoch;
5. print the table and write results.json and the plots.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..tiny import TinyModelSpec
from ..train import load_config, train
from .evaluate import EvalConfig, Evaluator, add_forget_quality, summary
from .minitofu import prepare_tiny

SPLIT_PAIRS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
METHOD_LABELS = {
    "ga": "GA",
    "graddiff": "GradDiff",
    "npo": "NPO",
    "npo_rt": "NPO+RT",
    "simnpo": "SimNPO",
    "idkdpo": "IdkDPO",
}


@dataclass
class DemoPreset:
    """Sizes and recipe. 40 authors x 8 QA: forget01 / 05 / 10 = 1 / 2 / 4 authors = 8 / 16 / 32
    questions, enough for the KS test to separate a memorised set (8 vs 8 fully separated: p ~ 2e-4).
    30 epochs at lr 3e-3 memorise `full` (answer NLL ~0.03 / token) on this model."""

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
    beta: float = 0.1
    simnpo_beta: float = 2.5
    methods: tuple[str, ...] = tuple(METHOD_LABELS)
    splits: tuple[str, ...] = tuple(SPLIT_PAIRS)
    max_new_tokens: int = 24


PRESETS = {
    "quick": DemoPreset(
        num_authors=10,
        qa_per_author=2,
        model=TinyModelSpec(hidden_size=32, intermediate_size=64),
        pretrain_epochs=2,
        finetune_epochs=2,
        unlearn_epochs=1,
        methods=("ga", "npo"),
        splits=("forget10",),
        max_new_tokens=8,
    ),
    "default": DemoPreset(),
    "full": DemoPreset(
        num_authors=100,
        model=TinyModelSpec(hidden_size=128, intermediate_size=352),
        pretrain_epochs=40,
        finetune_epochs=60,
        unlearn_epochs=10,
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


def _finetune(
    model: Path, data: Path, split: str, out: Path, preset: DemoPreset, epochs: float, seed: int
) -> Path:
    config = load_config(
        None,
        [
            f"model.name_or_path={model}",
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
            f"run.seed={seed}",
        ],
    )
    return Path(train(config)["final"])


def run_demo(
    out_dir: str | Path = "runs/demo", preset: str | DemoPreset = "default", seed: int = 0, log=print
) -> dict:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset_name, preset = preset, PRESETS[preset]
    else:
        preset_name = "custom"
    out = Path(out_dir)
    timings, started = {}, time.perf_counter()

    def stage(name):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log(f"[demo] {name} done ({timings[name]:.0f} s)")

    paths = prepare_tiny(
        out / "setup",
        seed=seed,
        num_authors=preset.num_authors,
        qa_per_author=preset.qa_per_author,
        spec=preset.model,
    )
    data = paths["data"]
    _write_pretrain_split(data)
    stage("prepare")
    pretrained = _finetune(
        paths["base"], data, "pretrain", out / "pretrained", preset, preset.pretrain_epochs, seed
    )
    stage("pretrain")
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
    stage("finetune")

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
        retain_reports[split] = evaluators[split].evaluate(
            AutoModelForCausalLM.from_pretrained(retain_models[split])
        )
        add_forget_quality(retain_reports[split], retain_reports[split])
        target_reports[split] = add_forget_quality(
            evaluators[split].evaluate(AutoModelForCausalLM.from_pretrained(target)), retain_reports[split]
        )
        log(
            f"[demo] {split}: target forget quality {target_reports[split]['forget_quality']:.3g} "
            f"(retain model 1.0), model utility {target_reports[split]['model_utility']:.3f}"
        )
    stage("evaluate target and retain models")

    runs: dict[str, dict[str, list[dict]]] = {}
    for split in preset.splits:
        runs[split] = {}
        for method in preset.methods:

            def evaluate(epoch, model, split=split):
                return summary(add_forget_quality(evaluators[split].evaluate(model), retain_reports[split]))

            beta = preset.simnpo_beta if method == "simnpo" else preset.beta
            config = load_config(
                None,
                [
                    f"model.name_or_path={target}",
                    f"data.forget={data}",
                    f"data.forget_split={split}",
                    f"data.retain={data}",
                    f"data.retain_split={SPLIT_PAIRS[split]}",
                    "data.max_length=96",
                    f"data.batch_size={preset.unlearn_batch_size}",
                    f"data.retain_batch_size={preset.unlearn_batch_size}",
                    f"method.name={method}",
                    f"method.beta={beta}",
                    f"optim.lr={preset.unlearn_lr}",
                    f"optim.epochs={preset.unlearn_epochs}",
                    "optim.warmup_epochs=1",
                    f"run.output_dir={out / 'unlearn' / split / method}",
                    f"run.cache_dir={out / 'ref-cache'}",
                    "run.overwrite=true",
                    "run.export=false",
                    "run.progress=false",
                    "run.log_every=0",
                    f"run.seed={seed}",
                ],
            )
            result = train(config, on_epoch_end=evaluate)
            runs[split][method] = [{"epoch": 0, **summary(target_reports[split])}, *result["epochs"]]
            last = runs[split][method][-1]
            log(
                f"[demo] {split} {METHOD_LABELS[method]:8s} forget quality {last['forget_quality']:.3g} "
                f"model utility {last['model_utility']:.3f}"
            )
        stage(f"unlearn {split}")

    results = {
        "preset": preset_name,
        "settings": asdict(preset),
        "seed": seed,
        "timings_s": timings,
        "threads": torch.get_num_threads(),
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
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    log(table)
    plot_results(results, out)
    log(
        f"[demo] wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'forget_quality_vs_utility.png'}, "
        f"{out / 'memorisation.png'}"
    )
    return results


def results_table(results: dict) -> str:
    """Forget quality / model utility per method and split: final epoch, and the epoch with the
    best forget quality (ties: higher utility)."""
    lines = [
        "| split | method | final FQ | final MU | best-FQ epoch | best FQ | MU there |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, methods in results["runs"].items():
        target, retain = results["target"][split], results["retain_models"][split]
        lines.append(
            f"| {split} | target (before) | {target['forget_quality']:.3g} | {target['model_utility']:.3f} | | | |"
        )
        lines.append(f"| {split} | retain model | 1 | {retain['model_utility']:.3f} | | | |")
        for method, epochs in methods.items():
            final = epochs[-1]
            best = max(epochs[1:], key=lambda e: (e["forget_quality"], e["model_utility"]))
            lines.append(
                f"| {split} | {METHOD_LABELS.get(method, method)} | {final['forget_quality']:.3g} | "
                f"{final['model_utility']:.3f} | {best['epoch']} | {best['forget_quality']:.3g} | "
                f"{best['model_utility']:.3f} |"
            )
    return "\n".join(lines)


def plot_results(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(results["runs"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for method, epochs in results["runs"][split].items():
            mu = [e["model_utility"] for e in epochs]
            fq = [max(e["forget_quality"], 1e-30) for e in epochs]
            ax.plot(mu, fq, marker="o", markersize=3, label=METHOD_LABELS.get(method, method))
            ax.annotate(str(epochs[-1]["epoch"]), (mu[-1], fq[-1]), fontsize=7)
        retain = results["retain_models"][split]
        ax.scatter(
            [retain["model_utility"]], [1.0], marker="*", s=160, color="black", label="retain model", zorder=5
        )
        target = results["target"][split]
        ax.scatter(
            [target["model_utility"]],
            [max(target["forget_quality"], 1e-30)],
            marker="s",
            s=60,
            color="grey",
            label="target (before)",
            zorder=5,
        )
        ax.axhline(0.05, linestyle="--", color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality (KS p-value)")
        ax.set_title(f"Mini-TOFU {split}: one point per epoch")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "forget_quality_vs_utility.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        memo = results["memorisation"][split]
        ratios = [r for r in memo["target"] + memo["retain"] if r > 0]
        low, high = math.log10(min(ratios)), math.log10(max(ratios))
        bins = [10 ** (low + (high - low) * k / 16) for k in range(17)]
        ax.hist(
            [min(max(r, bins[0]), bins[-1]) for r in memo["target"]], bins=bins, alpha=0.6, label="target"
        )
        ax.hist(
            [min(max(r, bins[0]), bins[-1]) for r in memo["retain"]],
            bins=bins,
            alpha=0.6,
            label="retain model",
        )
        ax.set_xscale("log")
        ax.set_xlabel("truth ratio on the forget set (lower: prefers the true answer)")
        ax.set_title(
            f"{split}: forget quality of the target {results['target'][split]['forget_quality']:.2g}"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memorisation.png", dpi=120)
    plt.close(fig)
