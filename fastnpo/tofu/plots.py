"""The demo's report: the results table and the figures (forget quality vs model utility, memorisation)."""

import math
from pathlib import Path

METHOD_LABELS = {
    "ga": "GA",
    "graddiff": "GradDiff",
    "npo": "NPO",
    "npo_rt": "NPO+RT",
    "simnpo": "SimNPO",
    "idkdpo": "IdkDPO",
}


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
    """Write forget_quality_vs_utility.png and memorisation.png into out."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a laptop run or in CI
    import matplotlib.pyplot as plt

    _plot_forget_quality_vs_utility(plt, results, out / "forget_quality_vs_utility.png")
    _plot_memorisation(plt, results, out / "memorisation.png")


def _plot_forget_quality_vs_utility(plt, results: dict, path: Path) -> None:
    """One panel per split, one line per method through its epochs (the NPO paper's figure)."""
    splits = list(results["runs"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for method, epochs in results["runs"][split].items():
            mu = [e["model_utility"] for e in epochs]
            fq = [max(e["forget_quality"], 1e-30) for e in epochs]
            ax.plot(mu, fq, marker="o", markersize=3, label=METHOD_LABELS.get(method, method))
            ax.annotate(str(epochs[-1]["epoch"]), (mu[-1], fq[-1]), fontsize=7)
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
        ax.axhline(0.05, linestyle="--", color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality (KS p-value)")
        ax.set_title(f"Mini-TOFU {split}: one point per epoch")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_memorisation(plt, results: dict, path: Path) -> None:
    """Forget-set truth ratios of the target vs the retain model: how much there was to forget."""
    splits = list(results["runs"])
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
        ax.set_xlabel("truth ratio on the forget set (lower: prefers the true answer)")
        ax.set_title(f"{split}: forget quality of the target {results['target'][split]['forget_quality']:.2g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
