"""The demo's report and the TOFU figures: the results table, forget quality vs model utility over
the epochs (median and min-max band over the unlearning seeds), memorisation, and the per-set bars
of one `fastnpo eval` (against a retain / target model when given)."""

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from ..methods import METHODS
from .metrics import MODEL_UTILITY_SPLITS

# Each method's label, from the method itself (fastnpo/methods/), in the registry's order.
METHOD_LABELS = {name: method.label for name, method in METHODS.items() if method.unlearns}

#: The sets `fastnpo eval` reports on, the per-set numbers drawn and their axis labels.
EVAL_SETS: tuple[str, ...] = ("forget", *MODEL_UTILITY_SPLITS)
EVAL_METRICS = {
    "probability": "probability",
    "truth_ratio": "truth ratio score\n(forget: min(R, 1/R); others: max(0, 1-R))",
    "rouge": "ROUGE-L recall",
}
SET_LABELS = {"forget": "forget", "retain": "retain", "real_authors": "real authors", "world_facts": "world facts"}
FQ_FLOOR = 1e-30  # forget quality 0 on a log axis
FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10}


def _format(value: float, fmt: str) -> str:
    """format(value, fmt), without the sign of a number that rounds to zero ("-0.0": privleak)."""
    text = format(value, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _spread(values: list[float], fmt: str) -> str:
    """median [min, max] over the unlearning seeds (the median alone for one seed)."""
    if len(values) == 1:
        return _format(values[0], fmt)
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{_format(mid, fmt)} [{_format(low, fmt)}, {_format(high, fmt)}]"


def _best(epochs: list[dict]) -> dict:
    """The evaluated epoch with the best forget quality (ties: higher utility); epoch 0 is the target."""
    return max(epochs[1:], key=lambda e: (e["forget_quality"], e["model_utility"]))


# The demo's privacy columns: summary key, column header, format (privleak is in percent).
PRIVACY_COLUMNS = (("privleak", "final privleak", ".1f"), ("extraction_strength", "final ES", ".2f"))
PRIVACY_NOTE = (
    "privleak: open-unlearning's privacy leakage, in percent: the relative difference of 1 - AUC against "
    "the split's retain model's 1 - AUC, AUC that of the Min-K% membership-inference attack (k = 40%) "
    "separating the forget split's answers from its holdout split's (holdout01 / 05 / 10: as many "
    "questions about authors no model here was trained on). The retain model is the reference, so its "
    "privleak is 0; near 0 is as private as a model that never saw the forget set, strongly negative "
    "(down to -100) means the forget set still looks like training data, positive that it looks less like "
    "training data than it does to the retain model (over-unlearning). It is coarse with few questions and "
    "AUC_retain far above 0.5: one forget / holdout pair ranked the other way moves it by "
    "100 / (n_forget x n_holdout x (1 - AUC_retain)) points (docs/evaluation.md). ES: extraction strength "
    "on the forget answers, the mean of 1 - k/L with k the "
    "first token from which the greedy prediction reproduces the rest of the answer; an answer it does not "
    "reproduce even from its last token scores 1/L (open-unlearning's loop), so the floor is about 1 over "
    "the answer length, not 0. Both at the final epoch, from the same forward passes as the other numbers."
)


def _privacy_note(results: Mapping, splits: Sequence[str]) -> str:
    """PRIVACY_NOTE, and the retain models' Min-K% AUC (privleak's reference) where the results have it."""
    aucs = [(s, results["retain_models"][s].get("mia_min_k")) for s in splits]
    known = [f"{split} {auc:.3f}" for split, auc in aucs if auc is not None]
    return PRIVACY_NOTE + (f" AUC_retain: {', '.join(known)}." if known else "")


def results_table(results: dict) -> str:
    """Forget quality (FQ) / model utility (MU) per method and split, as median [min, max] over
    the unlearning seeds: at the final epoch, and at the epoch with the best forget quality; with
    privleak and extraction strength (ES) at the final epoch when the results have them (a demo
    before they were reported has not: its table is unchanged; a missing number reads n/a).
    Every seed must hold every split and method: a ValueError names the first one missing."""
    seeds, splits = _check_results(results)
    first = results["runs"][seeds[0]]
    entries = [results[what][split] for what in ("target", "retain_models") for split in splits]
    entries += [run[-1] for seed in seeds for split in splits for run in results["runs"][seed][split].values()]
    privacy = [column for column in PRIVACY_COLUMNS if any(column[0] in entry for entry in entries)]

    def privacy_cells(final: list[dict]) -> list[str]:
        return [
            _spread([e[key] for e in final], fmt) if all(key in e for e in final) else "n/a" for key, _, fmt in privacy
        ]

    header = ["split", "method", "final FQ", "final MU", *(title for _, title, _ in privacy)]
    header += ["best FQ", "MU there", "best-FQ epoch per seed"]
    blank = [""] * 3
    lines = [
        f"Unlearning seeds {', '.join(seeds)}: median [min, max] over the seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for split, methods in first.items():
        target, retain = results["target"][split], results["retain_models"][split]
        rows = [
            [
                "target (before)",
                f"{target['forget_quality']:.2g}",
                f"{target['model_utility']:.3f}",
                *privacy_cells([target]),
            ],
            ["retain model", "1", f"{retain['model_utility']:.3f}", *privacy_cells([retain])],
        ]
        for method in methods:
            runs = [results["runs"][seed][split][method] for seed in seeds]
            final = [run[-1] for run in runs]
            best = [_best(run) for run in runs]
            rows.append(
                [
                    METHOD_LABELS.get(method, method),
                    _spread([e["forget_quality"] for e in final], ".2g"),
                    _spread([e["model_utility"] for e in final], ".3f"),
                    *privacy_cells(final),
                    _spread([e["forget_quality"] for e in best], ".2g"),
                    _spread([e["model_utility"] for e in best], ".3f"),
                    ", ".join(str(e["epoch"]) for e in best),
                ]
            )
        for n, row in enumerate(rows):
            cells = [split, *row, *(blank if n < 2 else [])]
            lines.append("|" + "".join(f" {cell} |" if cell else " |" for cell in cells))
    if privacy:
        lines += ["", _privacy_note(results, splits)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ seed spread


class Spread(NamedTuple):
    """One number per evaluated epoch, over the unlearning seeds: median, min and max."""

    epochs: list[int]
    median: list[float]
    low: list[float]
    high: list[float]


def epoch_spread(runs: Sequence[Sequence[Mapping]], key: str) -> Spread:
    """Median, min and max of `key` per epoch over `runs` (one list of evaluated epochs per seed,
    each a dict with "epoch" and `key`). An epoch counts the seeds that evaluated it."""
    if not runs or not any(runs):
        raise ValueError("runs is empty: epoch_spread needs the evaluated epochs of at least one seed")
    by_epoch: dict[int, list[float]] = {}
    for n, run in enumerate(runs):
        for entry in run:
            if key not in entry or "epoch" not in entry:
                raise ValueError(f"runs[{n}] has an epoch without {key!r} (or without 'epoch'): {sorted(entry)}")
            by_epoch.setdefault(int(entry["epoch"]), []).append(float(entry[key]))
    epochs = sorted(by_epoch)
    return Spread(
        epochs,
        [statistics.median(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def _check_results(results: Mapping) -> tuple[list[str], list[str]]:
    """The seeds and splits of a demo results dict; a clear error for what a figure cannot use.

    Every seed must hold every split seed 0 has, and in each split every method any seed has, with
    at least one evaluated epoch: a seed missing one is a ValueError naming the seed, split and
    method, not a median silently taken over fewer seeds than the figure and table say."""
    runs = results.get("runs") if isinstance(results, Mapping) else None
    if not runs:
        raise ValueError("results['runs'] is empty: no unlearning run to plot")
    seeds = list(runs)
    splits = list(runs[seeds[0]])
    if not splits:
        raise ValueError(f"results['runs'][{seeds[0]!r}] holds no split")
    for seed in seeds:
        for split in splits:
            if split not in runs[seed] or not runs[seed][split]:
                raise ValueError(f"results['runs'][{seed!r}] has no method for split {split!r}")
    for split in splits:
        methods = dict.fromkeys(m for seed in seeds for m in runs[seed][split])
        for seed in seeds:
            for method in methods:
                if method not in runs[seed][split]:
                    have = [s for s in seeds if method in runs[s][split]]
                    raise ValueError(
                        f"results['runs'][{seed!r}][{split!r}] has no method {method!r} "
                        f"(seed(s) {', '.join(map(repr, have))} have it): every seed needs every method"
                    )
                if not runs[seed][split][method]:
                    raise ValueError(f"results['runs'][{seed!r}][{split!r}][{method!r}] has no evaluated epoch")
    for what in ("target", "retain_models"):
        for split in splits:
            if split not in results.get(what, {}):
                raise ValueError(f"results[{what!r}] has no split {split!r}")
    return seeds, splits


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a laptop run or in CI
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------ the demo's figures


def plot_results(results: dict, out: Path) -> None:
    """Write forget_quality_vs_utility.png and memorisation.png into out."""
    out = Path(out)
    plot_forget_quality_vs_utility(results, out / "forget_quality_vs_utility.png")
    plot_memorisation(results, out / "memorisation.png")


def _method_colors(plt, methods: list[str]) -> dict:
    return {m: (f"C{k}" if len(methods) <= 10 else plt.cm.tab20(k % 20)) for k, m in enumerate(methods)}


def plot_forget_quality_vs_utility(results: dict, path: Path) -> None:
    """One column per split. Top: forget quality against model utility, each method's median over
    the seeds through its epochs (the NPO paper's figure), the final epoch's min-max over the seeds as
    error bars. Below: forget quality and model utility per epoch, median line and min-max band;
    their ticks are every epoch any method of the split was evaluated at. A split may lack a method
    another split has (the one legend still names every method), but every seed must hold the same
    methods per split: see _check_results for the ValueError otherwise."""
    seeds, splits = _check_results(results)
    plt = _pyplot()
    methods = list(dict.fromkeys(m for split in splits for m in results["runs"][seeds[0]][split]))
    colors = _method_colors(plt, methods)
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(
            3, len(splits), figsize=(5.6 * len(splits), 13.5), squeeze=False, height_ratios=(1.35, 1, 1)
        )
        for col, split in enumerate(splits):
            _draw_split(axes[:, col], results, split, seeds, colors)
        _split_figure_legend(plt, fig, axes, methods, colors)
        fig.text(
            0.5,
            0.005,
            f"Lines: each method's median over the {len(seeds)} unlearning seed(s) at every evaluated epoch, from the "
            "target (epoch 0); diamond: the last epoch, its error bars and the shaded bands the min-max over the "
            "seeds. Above the dashed line (KS p = 0.05) the forget-set truth ratios are not distinguishable from the "
            "retain model's.",
            ha="center",
            va="bottom",
            fontsize=10,
            wrap=True,
        )
        fig.tight_layout(rect=(0, 0.075, 1, 1))
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _draw_split(column, results: dict, split: str, seeds: list[str], colors: dict) -> None:
    """One split's column: the trade-off panel, forget quality per epoch, model utility per epoch."""
    trade, fq_ax, mu_ax = column
    target, retain = results["target"][split], results["retain_models"][split]
    # The reference markers sit beneath the method lines (zorder 1 < 3): no method hides under them.
    trade.scatter(
        [retain["model_utility"]],
        [1.0],
        marker="*",
        s=260,
        color="gold",
        edgecolor="black",
        zorder=1,
        label="retain model",
    )
    trade.scatter(
        [target["model_utility"]],
        [max(target["forget_quality"], FQ_FLOOR)],
        marker="s",
        s=110,
        color="lightgrey",
        edgecolor="black",
        zorder=1,
        label="target (epoch 0)",
    )
    epochs: set[int] = set()  # every method's evaluated epochs: the per-epoch panels' ticks
    for method in results["runs"][seeds[0]][split]:
        runs = [results["runs"][seed][split][method] for seed in seeds]
        epochs.update(_draw_method(column, runs, colors[method], METHOD_LABELS.get(method, method)))
    for ax in (trade, fq_ax):
        ax.axhline(0.05, linestyle="--", color="grey", linewidth=1, zorder=0, label="KS p = 0.05")
        ax.set_yscale("log")
        ax.set_ylabel("forget quality (KS p-value)")
    trade.set_xlabel("model utility")
    trade.set_title(f"Mini-TOFU {split}: forget quality vs model utility")
    fq_ax.set_title(f"{split}: forget quality per epoch")
    mu_ax.axhline(retain["model_utility"], color="black", linestyle=":", linewidth=1.2, zorder=0)
    mu_ax.axhline(target["model_utility"], color="grey", linestyle="-.", linewidth=1.2, zorder=0)
    mu_ax.set_ylabel("model utility")
    mu_ax.set_title(f"{split}: model utility per epoch")
    for ax in (fq_ax, mu_ax):
        ax.set_xlabel("epoch")
        ax.set_xticks(sorted(epochs))
    for ax in column:
        ax.grid(alpha=0.3, zorder=0)


def _draw_method(column, runs: list, color, label: str) -> list[int]:
    """One method in a split's column (runs: its evaluated epochs per seed); returns those epochs."""
    trade, fq_ax, mu_ax = column
    fq, mu = epoch_spread(runs, "forget_quality"), epoch_spread(runs, "model_utility")
    floor = [max(v, FQ_FLOOR) for v in fq.median]
    trade.plot(mu.median, floor, marker="o", markersize=4, linewidth=1.8, color=color, zorder=3, label=label)
    trade.errorbar(
        [mu.median[-1]],
        [floor[-1]],
        xerr=[[mu.median[-1] - mu.low[-1]], [mu.high[-1] - mu.median[-1]]],
        yerr=[[floor[-1] - max(fq.low[-1], FQ_FLOOR)], [max(fq.high[-1], FQ_FLOOR) - floor[-1]]],
        marker="D",
        markersize=8,
        markeredgecolor="black",
        color=color,
        elinewidth=1.2,
        capsize=3,
        zorder=4,
    )
    for ax, spread in ((fq_ax, fq), (mu_ax, mu)):
        low = [max(v, FQ_FLOOR) for v in spread.low] if ax is fq_ax else spread.low
        mid = floor if ax is fq_ax else spread.median
        high = [max(v, FQ_FLOOR) for v in spread.high] if ax is fq_ax else spread.high
        ax.fill_between(spread.epochs, low, high, color=color, alpha=0.13, linewidth=0, zorder=2)
        ax.plot(spread.epochs, mid, marker="o", markersize=4, linewidth=1.8, color=color, zorder=3)
    return fq.epochs


def _split_figure_legend(plt, fig, axes, methods: list[str], colors: dict) -> None:
    """The figure's one legend: the first panel's entries, the reference lines, every method once."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="black", linestyle=":"), plt.Line2D([], [], color="grey", linestyle="-.")]
    labels += ["retain model's utility", "target's utility"]
    # The methods of every split, once: the first panel may lack one another split has.
    by_label = dict(zip(labels, handles, strict=True))
    for method in methods:
        by_label.setdefault(METHOD_LABELS.get(method, method), plt.Line2D([], [], color=colors[method]))
    fig.legend(
        by_label.values(),
        by_label.keys(),
        loc="lower center",
        ncol=min(len(by_label), 7),
        bbox_to_anchor=(0.5, 0.035),
        frameon=False,
        fontsize=11,
    )


def plot_memorisation(results: dict, path: Path) -> None:
    """Forget-set truth ratios of the target vs the retain model: how much there was to forget."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    plt = _pyplot()
    splits = list(results.get("memorisation") or {})
    if not splits:
        raise ValueError("results['memorisation'] is empty: no truth ratios to plot")
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


# ------------------------------------------------------------------------------ `fastnpo eval`


def _flat(report: Mapping) -> dict:
    """A report's headline numbers as "set/metric" keys (a summary passes through)."""
    out = {k: v for k, v in report.items() if not isinstance(v, Mapping)}
    for name, stats in report.items():
        if isinstance(stats, Mapping):
            out.update({f"{name}/{k}": v for k, v in stats.items() if isinstance(v, int | float)})
    return out


def _fq_bottom(flats: Mapping[str, Mapping]) -> float:
    """The lower end of the forget-quality axis: a decade below the smallest value and 0.05."""
    values = [max(f["forget_quality"], FQ_FLOOR) for f in flats.values() if f.get("forget_quality") is not None]
    return 10 ** math.floor(math.log10(min([0.05, *values])) - 1)


def plot_eval(reports: Mapping[str, Mapping], path: Path, *, sets: Sequence[str] = EVAL_SETS, title: str = "") -> None:
    """Bars of one or more TOFU evaluations side by side (label -> `fastnpo eval` report or its
    summary): probability, truth ratio score and ROUGE-L per set, model utility, forget quality."""
    flats = _eval_numbers(reports, sets)
    plt = _pyplot()
    width = 0.8 / len(flats)
    colors = {label: f"C{k}" for k, label in enumerate(flats)}
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
        panels = [*EVAL_METRICS.items(), ("model_utility", "model utility"), ("forget_quality", None)]
        for ax, (metric, ylabel) in zip(axes.flat, panels, strict=False):
            per_set = metric in EVAL_METRICS
            keys = [f"{s}/{metric}" for s in sets] if per_set else [metric]
            _draw_eval_bars(ax, metric, keys, flats, width, colors)
            _label_eval_panel(ax, metric, ylabel, keys, sets, flats)
        _eval_legend(plt, axes.flat[-1], flats, colors)
        fig.suptitle(title or "TOFU evaluation", fontsize=14)
        fig.tight_layout(pad=1.5)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _eval_numbers(reports: Mapping[str, Mapping], sets: Sequence[str]) -> dict:
    """Each report's numbers (_flat), after refusing what plot_eval cannot draw."""
    if not reports:
        raise ValueError("reports is empty: give at least one label -> report")
    unknown = [s for s in sets if s not in EVAL_SETS]
    if unknown or not sets:
        raise ValueError(f"sets {list(sets)!r}: each must be one of {list(EVAL_SETS)}")
    flats = {label: _flat(report) for label, report in reports.items()}
    wanted = [f"{s}/{m}" for s in sets for m in EVAL_METRICS] + ["model_utility", "forget_quality"]
    for label, flat in flats.items():
        if not any(k in flat for k in wanted):
            raise ValueError(f"reports[{label!r}] holds none of the TOFU numbers ({', '.join(wanted[:3])}, ...)")
    return flats


def _draw_eval_bars(ax, metric: str, keys: list[str], flats: dict, width: float, colors: dict) -> None:
    """One panel's bars: a group per key, a bar per report side by side, "n/a" where a report lacks the number."""
    for k, (label, flat) in enumerate(flats.items()):
        xs = [i + (k - (len(flats) - 1) / 2) * width for i in range(len(keys))]
        values = [flat.get(key) for key in keys]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        for x, v in zip(xs, values, strict=True):
            if v is None:  # x in data, y in axes coordinates: the same spot on a linear or log axis
                ax.text(
                    x,
                    0.02,
                    "n/a",
                    ha="center",
                    va="bottom",
                    fontsize=10,
                    color="grey",
                    transform=ax.get_xaxis_transform(),
                )
        if not shown:
            continue
        # On the log axis of forget quality the bars stand on a floor below the smallest value.
        bottom = _fq_bottom(flats) if metric == "forget_quality" else 0.0
        bars = ax.bar(
            [x for x, _ in shown],
            [max(v, FQ_FLOOR) - bottom for _, v in shown],
            width * 0.95,
            bottom=bottom,
            color=colors[label],
            label=label,
            zorder=2,
        )
        ax.bar_label(
            bars,
            labels=[f"{v:.2g}" if metric == "forget_quality" else f"{v:.2f}" for _, v in shown],
            fontsize=9,
            padding=2,
        )


def _label_eval_panel(ax, metric: str, ylabel: str | None, keys: list[str], sets: Sequence[str], flats: dict) -> None:
    """One panel's axes: set names below the per-set panels, a log scale for forget quality."""
    per_set = metric in EVAL_METRICS
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_xticks(range(len(keys)) if per_set else [])
    if per_set:
        ax.set_xticklabels([SET_LABELS[s] + ("" if s == "forget" else "*") for s in sets])
    ax.grid(axis="y", alpha=0.3, zorder=0)
    if metric == "forget_quality":
        ax.set_yscale("log")
        ax.set_ylim(_fq_bottom(flats), 3)
        ax.axhline(0.05, linestyle="--", color="grey", linewidth=1, zorder=1)
        ax.set_ylabel("forget quality (KS p-value, log)")
        ax.set_title("forget quality (above the dashed line p = 0.05:\nforget set like the retain model's)")
    else:
        ax.set_ylim(0, 1.12)
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split("\n")[0] + (" per set" if per_set else ""))


def _eval_legend(plt, legend_ax, flats: dict, colors: dict) -> None:
    """The last panel: no plot, the legend of the models and what * and n/a mean."""
    legend_ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in flats]
    legend_ax.legend(handles, list(flats), loc="upper left", frameon=False, fontsize=11, title="model")
    legend_ax.text(
        0.0,
        0.05,
        "* enters model utility: the harmonic mean of\nprobability, truth ratio score and ROUGE-L on the\n"
        "retain, real-authors and world-facts sets.\nn/a: not in the report (forget quality needs\n"
        "--retain-stats; ROUGE-L and model utility\nneed generation).",
        transform=legend_ax.transAxes,
        va="bottom",
        fontsize=10,
    )
