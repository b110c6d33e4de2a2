"""The TOFU figures (issue 22 item 7): the demo's forget quality vs model utility as each method's
median over the seeds with a min-max band and one legend, the `fastnpo eval` bar chart, and what
they refuse."""

import json
import random
import statistics

import matplotlib
import pytest

matplotlib.use("Agg")
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from fastnpo.tofu.plots import (
    EVAL_METRICS,
    EVAL_SETS,
    METHOD_LABELS,
    epoch_spread,
    plot_eval,
    plot_forget_quality_vs_utility,
    plot_results,
    results_table,
)

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """The figures saved during a test (still open to inspection: savefig runs before close)."""
    saved = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _entry(rng, epoch):
    # A forget quality of 0 now and then: the log axis must survive it.
    fq = 0.0 if rng.random() < 0.1 else 10 ** rng.uniform(-9, 0)
    return {"epoch": epoch, "forget_quality": fq, "model_utility": rng.uniform(0, 0.5)}


def synthetic_results(rng, seeds=3, splits=("forget01", "forget05"), methods=("ga", "npo", "rmu"), epochs=5):
    """A demo results dict with fresh random numbers: `seeds` seeds, evaluated every 2 epochs."""
    evaluated = [2 * e for e in range(epochs)]
    return {
        "target": {
            s: {"forget_quality": 10 ** rng.uniform(-5, -1), "model_utility": rng.uniform(0.3, 0.5)} for s in splits
        },
        "retain_models": {s: {"forget_quality": 1.0, "model_utility": rng.uniform(0.3, 0.5)} for s in splits},
        "memorisation": {
            s: {"target": [rng.uniform(0.1, 3) for _ in range(7)], "retain": [rng.uniform(0.1, 3) for _ in range(7)]}
            for s in splits
        },
        "runs": {
            str(seed): {s: {m: [_entry(rng, e) for e in evaluated] for m in methods} for s in splits}
            for seed in range(seeds)
        },
    }


def test_epoch_spread_is_median_min_max_per_epoch():
    rng = random.Random()
    # Three seeds; the third skipped epoch 4: that epoch has two values (median = their mean).
    runs = [[{"epoch": e, "x": rng.uniform(-3, 3)} for e in (0, 2, 4)] for _ in range(3)]
    runs[2] = [r for r in runs[2] if r["epoch"] != 4]
    spread = epoch_spread(runs, "x")
    assert spread.epochs == [0, 2, 4]
    for i, epoch in enumerate(spread.epochs):
        values = sorted(r["x"] for run in runs for r in run if r["epoch"] == epoch)
        middle = values[1] if len(values) == 3 else (values[0] + values[1]) / 2
        assert spread.median[i] == pytest.approx(middle)
        assert (spread.low[i], spread.high[i]) == (values[0], values[-1])
    one = epoch_spread([[{"epoch": 3, "x": 0.25}]], "x")
    assert one == ([3], [0.25], [0.25], [0.25])


def test_epoch_spread_refuses_empty_and_missing_keys():
    with pytest.raises(ValueError, match="runs is empty"):
        epoch_spread([], "forget_quality")
    with pytest.raises(ValueError, match="runs is empty"):
        epoch_spread([[], []], "forget_quality")
    with pytest.raises(ValueError, match=r"runs\[1\].*'forget_quality'"):
        epoch_spread([[{"epoch": 0, "forget_quality": 0.5}], [{"epoch": 0, "model_utility": 0.5}]], "forget_quality")


def test_forget_quality_vs_utility_draws_medians_bands_and_one_legend(tmp_path, figures):
    rng = random.Random()
    seeds, methods = 3, ("ga", "npo", "rmu")
    results = synthetic_results(rng, seeds=seeds, methods=methods)
    path = tmp_path / "fq.png"
    plot_forget_quality_vs_utility(results, path)
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
    (fig,) = figures
    labels = {METHOD_LABELS[m] for m in methods}
    trade, fq_ax, mu_ax = fig.axes[0], fig.axes[2], fig.axes[4]  # row-major: first split's column
    assert [ax.get_legend() for ax in fig.axes] == [None] * len(fig.axes), "a legend inside a panel"
    assert len(fig.legends) == 1
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert labels | {"retain model", "target (epoch 0)", "KS p = 0.05"} <= legend
    # One line per method (the median), not one per method and seed.
    method_lines = [line for line in trade.get_lines() if line.get_label() in labels]
    assert len(method_lines) == len(methods)
    # The first split's GA line is the median over the seeds, per epoch.
    runs = [results["runs"][str(s)]["forget01"]["ga"] for s in range(seeds)]
    ga = next(line for line in method_lines if line.get_label() == "GA")
    assert list(ga.get_xdata()) == pytest.approx(
        [statistics.median(run[i]["model_utility"] for run in runs) for i in range(len(runs[0]))]
    )
    # A min-max band per method in the per-epoch panels.
    for ax in (fq_ax, mu_ax):
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == len(methods)
        assert ax.get_ylabel()
    # The target / retain markers lie beneath every method line: none hides under them.
    markers = [c for c in trade.collections if c.get_label() in ("retain model", "target (epoch 0)")]
    assert len(markers) == 2
    assert max(c.get_zorder() for c in markers) < min(line.get_zorder() for line in method_lines)
    # Readable: no text smaller than 9 points.
    texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels())]
    texts += list(fig.legends[0].get_texts()) + list(fig.texts)
    assert min(t.get_fontsize() for t in texts if t.get_text()) >= 9


def test_plot_results_with_one_seed_and_a_split_missing_a_method(tmp_path, figures):
    rng = random.Random()
    results = synthetic_results(rng, seeds=1, splits=("forget01", "forget10"), methods=("ga", "simnpo"), epochs=1)
    # The first split (whose panel the legend starts from) lacks SimNPO; the second has it.
    del results["runs"]["0"]["forget01"]["simnpo"]
    plot_results(results, tmp_path)
    for name in ("forget_quality_vs_utility.png", "memorisation.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG), name
    fig = figures[0]
    first_panel = fig.axes[0].get_legend_handles_labels()[1]
    assert "GA" in first_panel and "SimNPO" not in first_panel
    assert len(fig.legends) == 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"GA", "SimNPO"} <= set(legend) and len(legend) == len(set(legend)), legend


def test_per_epoch_ticks_are_every_methods_epochs(tmp_path, figures):
    rng = random.Random()
    results = synthetic_results(rng, seeds=2, splits=("forget05",), methods=("ga", "npo"), epochs=5)
    # The last method drawn stopped early: the ticks must still reach GA's last epoch.
    for seed in results["runs"].values():
        seed["forget05"]["npo"] = [e for e in seed["forget05"]["npo"] if e["epoch"] <= 2]
    plot_forget_quality_vs_utility(results, tmp_path / "fq.png")
    (fig,) = figures
    for ax in fig.axes[1:3]:  # one split: forget quality and model utility per epoch
        assert list(ax.get_xticks()) == [0, 2, 4, 6, 8], ax.get_title()


def test_a_seed_missing_a_method_is_a_clear_error(tmp_path):
    rng = random.Random()
    results = synthetic_results(rng, seeds=3, methods=("ga", "npo"))
    del results["runs"]["1"]["forget05"]["npo"]
    message = r"results\['runs'\]\['1'\]\['forget05'\] has no method 'npo' \(seed\(s\) '0', '2' have it\)"
    with pytest.raises(ValueError, match=message):
        plot_forget_quality_vs_utility(results, tmp_path / "x.png")
    with pytest.raises(ValueError, match=message):
        results_table(results)
    # A method only a later seed has is no more drawable over all the seeds.
    results = synthetic_results(rng, seeds=2, methods=("ga",))
    results["runs"]["1"]["forget01"]["rmu"] = results["runs"]["1"]["forget01"]["ga"]
    with pytest.raises(ValueError, match=r"\['0'\]\['forget01'\] has no method 'rmu' \(seed\(s\) '1' have it\)"):
        plot_forget_quality_vs_utility(results, tmp_path / "x.png")
    results = synthetic_results(rng, seeds=2, methods=("ga",))
    results["runs"]["1"]["forget01"]["ga"] = []
    with pytest.raises(ValueError, match=r"\['1'\]\['forget01'\]\['ga'\] has no evaluated epoch"):
        plot_forget_quality_vs_utility(results, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_results_refuses_what_it_cannot_draw(tmp_path):
    rng = random.Random()
    with pytest.raises(ValueError, match=r"results\['runs'\] is empty"):
        plot_forget_quality_vs_utility({"runs": {}}, tmp_path / "x.png")
    results = synthetic_results(rng)
    del results["target"]["forget05"]
    with pytest.raises(ValueError, match=r"results\['target'\] has no split 'forget05'"):
        plot_forget_quality_vs_utility(results, tmp_path / "x.png")
    results = synthetic_results(rng)
    results["runs"]["1"]["forget01"] = {}
    with pytest.raises(ValueError, match=r"results\['runs'\]\['1'\] has no method for split 'forget01'"):
        plot_forget_quality_vs_utility(results, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _rows(table: str) -> list[list[str]]:
    """The cells of a markdown table's rows (header and separator included)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]


def test_results_table_adds_privleak_and_extraction_strength_when_the_results_have_them():
    rng = random.Random()
    results = synthetic_results(rng, seeds=3, splits=("forget01",), methods=("ga", "npo"))
    without = results_table(results)
    assert "privleak" not in without and "ES" not in without  # an older demo's table: as it was
    results["target"]["forget01"].update(privleak=-87.04, extraction_strength=0.912)
    results["retain_models"]["forget01"].update(privleak=0.0, extraction_strength=0.131)
    for seed, privleak in zip(("0", "1", "2"), (-12.3, -0.04, 40.0), strict=True):
        for method in ("ga", "npo"):
            results["runs"][seed]["forget01"][method][-1].update(privleak=privleak, extraction_strength=0.25)
    table = results_table(results)
    rows = _rows(table)
    assert rows[0] == [
        "split",
        "method",
        "final FQ",
        "final MU",
        "final privleak",
        "final ES",
        "best FQ",
        "MU there",
        "best-FQ epoch per seed",
    ]
    assert rows[2][1:6] == ["target (before)", rows[2][2], rows[2][3], "-87.0", "0.91"] and rows[2][6:] == [""] * 3
    assert rows[3][1:] == ["retain model", "1", rows[3][3], "0.0", "0.13", "", "", ""]
    # median [min, max] over the seeds; -0.04 rounds to 0.0, not -0.0.
    assert [row[4] for row in rows[4:]] == ["0.0 [-12.3, 40.0]"] * 2 and "-0.0" not in table
    # The other columns are the table without the privacy columns, cell for cell.
    assert [row[:4] + row[6:] for row in rows] == _rows(without)
    assert "privleak: open-unlearning's privacy leakage" in table and "retain model is the reference" in table
    assert "AUC_retain:" not in table  # no AUC in these results: none invented
    results["retain_models"]["forget01"]["mia_min_k"] = 0.8125
    assert results_table(results).endswith(" AUC_retain: forget01 0.812.")
    # A number missing from a row reads n/a, not a median over fewer seeds.
    del results["runs"]["1"]["forget01"]["npo"][-1]["privleak"]
    rows = _rows(results_table(results))
    assert rows[-1][1] == "NPO" and rows[-1][4] == "n/a" and rows[-2][4] == "0.0 [-12.3, 40.0]"


def random_summary(rng, forget_quality=True):
    out = {f"{s}/{m}": rng.random() for s in EVAL_SETS for m in (*EVAL_METRICS, "mean_truth_ratio")}
    out["model_utility"] = rng.random()
    if forget_quality:
        out["forget_quality"] = 10 ** rng.uniform(-8, 0)
    return out


def test_plot_eval_bars_side_by_side(tmp_path, figures):
    rng = random.Random()
    full_report = {
        s: {
            "probability": rng.random(),
            "truth_ratio": rng.random(),
            "rouge": rng.random(),
            "truth_ratios": [rng.random() for _ in range(5)],
        }
        for s in EVAL_SETS
    }
    full_report["model_utility"] = rng.random()  # a `fastnpo eval --out` report, no forget quality
    reports = {"evaluated": random_summary(rng), "retain model": full_report, "target": random_summary(rng)}
    path = tmp_path / "eval.png"
    plot_eval(reports, path, title="a title")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
    (fig,) = figures
    probability = fig.axes[0]
    # One bar per set and model, the model's numbers as given.
    assert len(probability.patches) == len(EVAL_SETS) * len(reports)
    heights = sorted(p.get_height() for p in probability.patches)
    expected = sorted(r[f"{s}/probability"] for r in (reports["evaluated"], reports["target"]) for s in EVAL_SETS)
    expected += [full_report[s]["probability"] for s in EVAL_SETS]
    assert heights == pytest.approx(sorted(expected))
    # Forget quality: two bars, and an n/a where the report has none.
    forget_quality = fig.axes[4]
    assert len(forget_quality.patches) == 2 and forget_quality.get_yscale() == "log"
    assert "n/a" in [t.get_text() for t in forget_quality.texts]
    for ax in fig.axes[:5]:
        assert ax.get_ylabel(), ax.get_title()
    legend = fig.axes[5].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(reports)


def test_plot_eval_refuses_bad_input(tmp_path):
    rng = random.Random()
    with pytest.raises(ValueError, match="reports is empty"):
        plot_eval({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"sets .*'forget20'"):
        plot_eval({"m": random_summary(rng)}, tmp_path / "x.png", sets=("forget", "forget20"))
    with pytest.raises(ValueError, match=r"reports\['empty one'\] holds none of the TOFU numbers"):
        plot_eval({"m": random_summary(rng), "empty one": {"loss": 1.0}}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------ `fastnpo eval` writes it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fastnpo.tiny import TinyModelSpec
    from fastnpo.tofu.minitofu import prepare_tiny

    return prepare_tiny(
        tmp_path_factory.mktemp("evalplot"),
        num_authors=10,
        qa_per_author=2,
        spec=TinyModelSpec(hidden_size=32, intermediate_size=64),
    )


def test_fastnpo_eval_writes_the_chart(tiny, tmp_path, capsys, figures):
    from fastnpo import cli

    common = ["eval", "--model", str(tiny["base"]), "--data", str(tiny["data"]), "--forget-split", "forget10"]
    # Refused before the evaluation: the chart's folder does not exist.
    assert cli.main([*common, "--plot", str(tmp_path / "nowhere" / "x.png")]) == 2
    assert "nowhere" in capsys.readouterr().err and not figures
    # --out retain.json: the chart lands beside it as retain.png.
    assert cli.main([*common, "--out", str(tmp_path / "retain.json")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["plot"] == str(tmp_path / "retain.png")
    assert (tmp_path / "retain.png").read_bytes().startswith(PNG)
    # Against the retain model, to an explicit path: two models side by side, forget quality of both.
    assert cli.main([*common, "--retain-stats", str(tmp_path / "retain.json"), "--plot", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").read_bytes().startswith(PNG)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["forget_quality"] == pytest.approx(1.0)
    fig = figures[-1]
    assert len(fig.axes[5].get_legend().get_texts()) == 2
    assert len(fig.axes[4].patches) == 2  # forget quality: the model's and the retain model's (1)
    assert max(p.get_y() + p.get_height() for p in fig.axes[4].patches) == pytest.approx(1.0)
    # --no-plot: no chart even with --out.
    assert cli.main([*common, "--out", str(tmp_path / "other.json"), "--no-plot"]) == 0
    assert not (tmp_path / "other.png").exists()
    assert "plot" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
