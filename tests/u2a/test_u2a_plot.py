"""u2a.png (issue 22 item 7): every panel says on its y axis what it measures."""

import random

import matplotlib
import pytest

matplotlib.use("Agg")
from matplotlib.figure import Figure

from fastnpo.u2a import save_plot


def _result(rng, iterations, kinds, reward=True):
    history = []
    for i in range(iterations):
        metrics = {"pref_accuracy": rng.random(), "logp_accuracy": rng.random(), "dpo_loss": rng.uniform(0.3, 0.9)}
        if reward:
            metrics["reward"] = rng.uniform(-1, 1)
        history.append({"iteration": i, "j": rng.uniform(0.3, 0.9), "metrics": metrics})
    return {"history": history, "kinds": kinds, "final_weights": [rng.random() for _ in kinds]}


@pytest.mark.parametrize("reward", [True, False])
def test_every_panel_has_a_y_label(tmp_path, monkeypatch, reward):
    saved = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    rng = random.Random()
    kinds = [rng.choice(["bad", "decoy", "neutral"]) for _ in range(13)] if reward else ["unknown"] * 5
    path = tmp_path / "u2a.png"
    result = _result(rng, 3, kinds, reward)
    save_plot(result, path)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5_000
    (fig,) = saved
    assert len(fig.axes) == (4 if reward else 3)  # the reward on its own axis: its scale is [-1, 1]
    for ax in fig.axes:
        assert ax.get_ylabel(), f"panel {ax.get_title()!r} has no y label"
    assert "nats" in fig.axes[0].get_ylabel()
    # The weights' axis names their sum, and the candidate axis has whole-number ticks only.
    assert f"{sum(result['final_weights']):.3g}" in fig.axes[2].get_ylabel()
    assert all(float(t).is_integer() for t in fig.axes[2].get_xticks())


def test_save_plot_refuses_an_empty_history(tmp_path):
    with pytest.raises(ValueError, match=r"result\['history'\] is empty"):
        save_plot({"history": [], "kinds": [], "final_weights": []}, tmp_path / "u2a.png")
