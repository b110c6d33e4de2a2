"""The demo's report: the results table and the figures (forget quality vs model utility, memorisation)."""

import math
import statistics
from pathlib import Path

METHOD_LABELS = {
    "ga": "GA",
    "graddiff": "GradDiff",
    "npo": "NPO",
    "npo_rt": "NPO+RT",
    "simnpo": "SimNPO",
    "idkdpo": "IdkDPO",
    "npo_kl": "NPO+KL",
    "wga": "WGA",
    "satimp": "SatImp",
    "ceu": "CE-U",
    "rmu": "RMU",
    "undial": "UNDIAL",
}


def _spread(values: list[float], fmt: str) -> str:
    """median [min, max] over the unlearning seeds (the median alone for one seed)."""
    if len(values) == 1:
        return format(values[0], fmt)
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _best(epochs: list[dict]) -> dict:
    """The evaluated epoch with the best forget quality (ties: higher utility); epoch 0 is the target."""
    return max(epochs[1:], key=lambda e: (e["forget_quality"], e["model_utility"]))


def results_table(results: dict) -> str:
    """Forget quality (FQ) / model utility (MU) per method and split, as median [min, max] over
    the unlearning seeds: at the final epoch, and at the epoch with the best forget quality."""
    seeds = list(results["runs"])
    first = results["runs"][seeds[0]]
    lines = [
        f"Unlearning seeds {', '.join(seeds)}: median [min, max] over the seeds.",
        "",
        "| split | method | final FQ | final MU | best FQ | MU there | best-FQ epoch per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, methods in first.items():
        target, retain = results["target"][split], results["retain_models"][split]
        lines.append(
            f"| {split} | target (before) | {target['forget_quality']:.2g} | {target['model_utility']:.3f} | | | |"
        )
        lines.append(f"| {split} | retain model | 1 | {retain['model_utility']:.3f} | | | |")
        for method in methods:
            runs = [results["runs"][seed][split][method] for seed in seeds]
            final = [run[-1] for run in runs]
            best = [_best(run) for run in runs]
            cells = (
                _spread([e["forget_quality"] for e in final], ".2g"),
                _spread([e["model_utility"] for e in final], ".3f"),
                _spread([e["forget_quality"] for e in best], ".2g"),
                _spread([e["model_utility"] for e in best], ".3f"),
                ", ".join(str(e["epoch"]) for e in best),
            )
            lines.append(f"| {split} | {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: dict, out: Path) -> None:
    """Write forget_quality_vs_utility.png and memorisation.png into out."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a laptop run or in CI
    import matplotlib.pyplot as plt

    _plot_forget_quality_vs_utility(plt, results, out / "forget_quality_vs_utility.png")
    _plot_memorisation(plt, results, out / "memorisation.png")


def _plot_forget_quality_vs_utility(plt, results: dict, path: Path) -> None:
    """One panel per split, one line per method through its epochs (the NPO paper's figure)."""
    seeds = list(results["runs"])
    splits = list(results["runs"][seeds[0]])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        methods = list(results["runs"][seeds[0]][split])
        for k, method in enumerate(methods):
            color = f"C{k}" if len(methods) <= 10 else plt.cm.tab20(k % 20)  # C0-C9 repeat after ten
            for n, seed in enumerate(seeds):
                epochs = results["runs"][seed][split][method]
                mu = [e["model_utility"] for e in epochs]
                fq = [max(e["forget_quality"], 1e-30) for e in epochs]
                label = METHOD_LABELS.get(method, method) if n == 0 else None
                ax.plot(mu, fq, marker="o", markersize=3, color=color, alpha=0.8, linewidth=1, label=label)
                # The number at a line's end is its last epoch: the other points are the epochs before.
                ax.annotate(str(epochs[-1]["epoch"]), (mu[-1], fq[-1]), fontsize=6, color=color)
        retain = results["retain_models"][split]
        ax.scatter([retain["model_utility"]], [1.0], marker="*", s=160, color="black", label="retain model", zorder=5)
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
        ax.axhline(0.05, linestyle="--", color="grey", linewidth=0.8, label="p = 0.05")
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality (KS p-value)")
        ax.set_title(f"Mini-TOFU {split}, {len(seeds)} unlearning seed(s)")
    axes[0][0].legend(fontsize=7)
    fig.text(
        0.5,
        0.005,
        "One line per method and unlearning seed, from the target (epoch 0) through the evaluated epochs; the "
        "number is the last epoch. Above the dashed line (KS p = 0.05) the forget-set truth ratios are not "
        "distinguishable from the retain model's.",
        ha="center",
        va="bottom",
        fontsize=7,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_memorisation(plt, results: dict, path: Path) -> None:
    """Forget-set truth ratios of the target vs the retain model: how much there was to forget."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    splits = list(results["memorisation"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        memo = results["memorisation"][split]
        ratios = [r for r in memo["target"] + memo["retain"] if r > 0]
        low, high = math.log10(min(ratios)), math.log10(max(ratios))
        bins = [10 ** (low + (high - low) * k / 16) for k in range(17)]
        for model, label in (("target", "target"), ("retain", "retain model")):
            clipped = [min(max(r, bins[0]), bins[-1]) for r in memo[model]]
            ax.hist(clipped, bins=bins, alpha=0.6, label=label)
        ax.set_xscale("log")
        # A decade-only locator: with automatic minor labels the ticks of a narrow range overlap.
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("truth ratio on the forget set (lower: prefers the true answer)")
        ax.set_ylabel("forget questions")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 ticks
        ax.set_title(f"{split}: forget quality of the target {results['target'][split]['forget_quality']:.2g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
