"""U2A: all-at-once scores vs per-example backward passes, the sign of every update on a
problem whose answer is known, the bi-level loop, preference data, config and bad input.

Measured score errors on the tiny model below (max |s - s_ref| / max |s_ref| against one
batch-1 backward per candidate): central differences with the calibrated step 5e-5 .. 3e-3
(Spearman 1.0), forward-mode JVP 1e-7 .. 1e-6 (Spearman 1.0). The asserts leave a margin.
"""

import copy
import json
import math

import datasets
import pytest
import torch
from scipy.stats import spearmanr

from fastnpo import u2a
from fastnpo.config import ConfigError
from fastnpo.data.preference import load_preference_data
from fastnpo.u2a.preference import (
    PreferenceSplit,
    split_preference,
    synthetic_preference_task,
    synthetic_reward,
)

TINY = [
    "data.j_size=6",
    "data.eval_size=4",
    "data.num_bad=8",
    "data.num_decoy=4",
    "data.num_neutral=4",
    "model.sft_epochs=5",
    "model.hidden_size=32",
    "model.num_hidden_layers=1",
    "model.vocab_size=300",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two threads on a busy two-core machine run these small matmuls several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    config = u2a.load_u2a_config(None, TINY)
    return config, u2a.prepare_task(config, log=lambda message: None)


def make_problem(task, unlearn="npo", lora=False):
    config, prepared = task
    model = copy.deepcopy(prepared.model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    problem = u2a.PreferenceUnlearningProblem.from_split(
        model,
        prepared.tokenizer,
        prepared.split,
        u2a.ObjectiveConfig(unlearn=unlearn),
        template=config.data.template,
        max_length=config.data.max_length,
    )
    if lora:  # B = 0 at init would leave A without gradient: move off the reference point
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return problem


def max_relative_error(scores, reference):
    return float((scores - reference).abs().max() / reference.abs().max())


# ---------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("unlearn", ["npo", "ga", "graddiff"])
def test_all_at_once_scores_equal_per_example_dot_products(task, unlearn):
    problem = make_problem(task, unlearn)
    _, grads = u2a.outer_gradient(problem)
    reference = u2a.scores_per_example(problem, grads)
    central, step, check = u2a.scores_central(problem, grads)
    jvp = u2a.scores_jvp(problem, grads)
    assert spearmanr(central, reference).statistic >= 0.99
    assert spearmanr(jvp, reference).statistic >= 0.99
    assert max_relative_error(central, reference) < 2e-2, (step, check)
    assert max_relative_error(jvp, reference) < 1e-4
    assert step in u2a.FD_LADDER and check < 1e-2


def test_lora_scores_and_parameters_restored(task):
    problem = make_problem(task, "npo", lora=True)
    params = problem.parameters()
    assert params and all("lora" in n for n, p in problem.wrapper.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in params]
    result = u2a.compute_scores(problem, "central")
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))  # bit-exact restore
    _, grads = u2a.outer_gradient(problem)
    reference = u2a.scores_per_example(problem, grads)
    assert spearmanr(result.scores, reference).statistic >= 0.99
    assert max_relative_error(result.scores, reference) < 2e-2
    assert max_relative_error(u2a.scores_jvp(problem, grads), reference) < 1e-4


def test_synthetic_scores_point_the_right_way(task):
    # Unlearning a decoy (a J-set chosen answer) must raise J: negative score on average;
    # unlearning a rude answer lowers it.
    problem = make_problem(task)
    scores = u2a.compute_scores(problem, "jvp").scores
    kinds = [c["kind"] for c in task[1].split.candidates]
    mean = {k: scores[[i for i, kk in enumerate(kinds) if kk == k]].mean() for k in ("bad", "decoy")}
    assert mean["decoy"] < 0 < mean["bad"]


# --------------------------------------------------------------------- a problem with a known answer


class QuadraticProblem:
    """J = |theta - target|^2 / 2; l_i = |theta - c_i|^2 / 2, so unlearning i pulls theta to c_i.
    Candidates near target help (score <target, c_i> > 0 at theta = 0); those near -target hurt."""

    def __init__(self, centers, target):
        self.theta = torch.nn.Parameter(torch.zeros(target.shape[0]))
        self.centers, self.target = centers, target

    num_candidates = property(lambda self: self.centers.shape[0])

    def parameters(self):
        return [self.theta]

    def outer_backward(self):
        value = 0.5 * ((self.theta - self.target) ** 2).sum()
        value.backward()
        return value.item()

    def outer_value(self):
        return float(0.5 * ((self.theta.detach() - self.target) ** 2).sum())

    def candidate_losses(self, indices=None):
        centers = self.centers if indices is None else self.centers[list(indices)]
        return 0.5 * ((self.theta - centers) ** 2).sum(-1)

    def shared_loss(self, indices=None):
        return None

    def inner_loss(self, indices, weights, step):
        return (weights * self.candidate_losses(indices)).mean()


def quadratic(n_good=6, n_bad=6, dim=5):
    # A fixed |target|: the inner budget (12 AdamW steps at lr 0.05) must be able to reach it
    # whatever the random draw (with an unscaled N(0, I) target, 1 draw in 40 could not).
    target = torch.randn(dim)
    target = 1.5 * target / target.norm()
    good = target + 0.3 * torch.randn(n_good, dim)
    bad = -target + 0.3 * torch.randn(n_bad, dim)
    return QuadraticProblem(torch.cat([good, bad]), target), n_good


def bilevel(**overrides):
    inner = u2a.InnerConfig(epochs=2, lr=0.05, batch_size=4, weight_decay=0.0)
    return u2a.BilevelConfig(**{"k": 6, "outer_iterations": 3, "eta": 2.0, "inner": inner, **overrides})


def test_one_step_hypergradient_sign():
    # theta'(w) = theta - a sum_i w_i grad l_i  =>  dJ(theta')/dw_i = -a <grad J(theta), grad l_i> at w = 0.
    torch.manual_seed(1)
    theta, a = torch.randn(4), 0.1
    anchors, target = torch.randn(7, 4), torch.randn(4)
    grads_l = torch.func.vmap(torch.func.grad(lambda th, c: torch.nn.functional.softplus(th @ c)), (None, 0))(
        theta, anchors
    )
    grad_j = torch.func.grad(lambda th: torch.logsumexp(th * target, 0))(theta)
    w = torch.zeros(7, requires_grad=True)
    j_after = torch.logsumexp((theta - a * (w[:, None] * grads_l).sum(0)) * target, 0)
    (dj_dw,) = torch.autograd.grad(j_after, w)
    scores = grads_l @ grad_j
    torch.testing.assert_close(dj_dw, -a * scores)
    # So a positive score means: more weight, lower J.


def test_loop_upweights_aligned_candidates_and_lowers_j():
    problem, n_good = quadratic()
    j0 = problem.outer_value()
    out = u2a.run_bilevel(problem, bilevel(score_method="central"))
    weights = torch.tensor(out["final_weights"])
    assert out["history"][-1]["j"] < 0.5 * j0
    assert sorted(out["history"][-1]["selected"]) == list(range(n_good))
    assert weights[:n_good].sum() == pytest.approx(6.0, rel=1e-5) and weights[n_good:].sum() == 0
    first = out["history"][1]
    assert min(first["scores"][:n_good]) > 0 > max(first["scores"][n_good:])


def test_flipped_sign_makes_j_go_up():
    problem, n_good = quadratic()
    j0 = problem.outer_value()
    out = u2a.run_bilevel(problem, bilevel(sign=-1.0))
    assert out["history"][-1]["j"] > j0
    assert sorted(out["history"][-1]["selected"]) == list(range(n_good, 2 * n_good))


def test_authors_variant_down_weights_the_best_of_its_selection():
    # Top-k by score keeps the helpful ones, but exp(-eta * score) gives the most helpful of
    # them the smallest weights: the weights come out anti-ordered to the scores.
    problem, n_good = quadratic()
    out = u2a.run_bilevel(problem, bilevel(sign=-1.0, select_by="score", outer_iterations=1))
    entry = out["history"][1]
    assert sorted(entry["selected"]) == list(range(n_good))
    scores = torch.tensor(entry["scores"])[:n_good]
    weights = torch.tensor(entry["weights"])[:n_good]
    assert spearmanr(scores, weights).statistic == pytest.approx(-1.0)


def test_baselines_run_the_same_loop():
    problem, _ = quadratic()
    uniform = u2a.run_bilevel(problem, bilevel(selection="uniform"))
    assert len(uniform["history"][1]["selected"]) == 12
    problem, _ = quadratic()
    rand = u2a.run_bilevel(problem, bilevel(selection="random"), seed=3)
    picks = [h["selected"] for h in rand["history"][1:]]
    assert len(picks[0]) == 6 and all(p == picks[0] for p in picks)


# ------------------------------------------------------------------------------ weights


def test_mirror_descent_step():
    log_w = u2a.uniform_log_weights(4, 4.0)
    scores = torch.tensor([2.0, -1.0, 0.0, 0.5])
    new = u2a.mirror_descent_step(log_w, scores, eta=1.0, total=4.0)
    w = new.exp()
    assert float(w.sum()) == pytest.approx(4.0) and bool((w > 0).all())
    assert w.argmax() == 0 and w.argmin() == 1  # up-weight positive scores
    sharper = u2a.mirror_descent_step(new, torch.zeros(4), eta=1.0, total=4.0, sparsity=1.0).exp()
    assert float(sharper.max()) > float(w.max())  # the entropy penalty concentrates the mass
    huge = u2a.mirror_descent_step(log_w, torch.tensor([1e30, -1e30, 0.0, 1.0]), eta=1e6, total=4.0)
    assert bool(torch.isfinite(huge).all())  # log space: no overflow into inf / NaN


def test_select_top_k():
    idx, w = u2a.select_top_k(torch.tensor([0.0, 3.0, 1.0, 2.0]), 2, total=5.0)
    assert idx.tolist() == [1, 3] and float(w.sum()) == pytest.approx(5.0)
    for k in (0, 5, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            u2a.select_top_k(torch.zeros(4), k, total=1.0)


# ----------------------------------------------------------------------------- bad input


def test_non_finite_scores_and_weights_raise():
    log_w = u2a.uniform_log_weights(3, 3.0)
    with pytest.raises(ValueError, match="scores contain NaN"):
        u2a.mirror_descent_step(log_w, torch.tensor([1.0, float("nan"), 0.0]), eta=1.0, total=3.0)
    with pytest.raises(ValueError, match="eta"):
        u2a.mirror_descent_step(log_w, torch.ones(3), eta=float("inf"), total=3.0)
    with pytest.raises(ValueError, match="candidates is empty"):
        u2a.uniform_log_weights(0, 1.0)


def test_k_larger_than_candidates_and_empty_sets():
    problem, _ = quadratic()
    with pytest.raises(ValueError, match=r"bilevel\.k: must be <= 12"):
        u2a.run_bilevel(problem, bilevel(k=13))
    problem.centers = problem.centers[:0]
    with pytest.raises(ValueError, match="candidates is empty"):
        u2a.run_bilevel(problem, bilevel())
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match="J set"):
        PreferenceSplit(j=[], eval=[], candidates=[{"prompt": "p", "response": "r"}]).check()
    with pytest.raises(ValueError, match="candidates is empty"):
        PreferenceSplit(j=[pair], eval=[], candidates=[]).check()


def test_nan_inner_loss_stops_before_touching_the_model():
    problem, _ = quadratic()
    problem.centers[3, 0] = float("nan")
    before = problem.theta.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        u2a.inner_unlearn(problem, torch.arange(12), torch.ones(12), u2a.InnerConfig(batch_size=12), seed=0)
    assert torch.equal(problem.theta.detach(), before)
    with pytest.raises(ValueError, match="scores contain NaN"):
        u2a.run_bilevel(problem, bilevel())  # the NaN candidate's score is NaN too


# ------------------------------------------------------------------------------------ data


def test_pku_and_ultrafeedback_layouts(tmp_path):
    pku = tmp_path / "pku.jsonl"
    rows = [
        {
            "prompt": "q1",
            "response_0": "a0",
            "response_1": "a1",
            "better_response_id": 1,
            "safer_response_id": 0,
        },
        {
            "prompt": "q2",
            "response_0": "b0",
            "response_1": "b1",
            "better_response_id": 0,
            "safer_response_id": 0,
        },
    ]
    pku.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_preference_data(str(pku))
    assert data[0] == {"prompt": "q1", "chosen": "a1", "rejected": "a0"}
    safer = load_preference_data(str(pku), preference_key="safer_response_id")
    assert safer[0]["chosen"] == "a0"

    def chat(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    uf = tmp_path / "train.parquet"
    datasets.Dataset.from_list(
        [
            {"prompt": "q", "chosen": chat("q", "good"), "rejected": chat("q", "bad")},
            {"prompt": "", "chosen": chat("q2", "g2"), "rejected": chat("q2", "b2")},
        ]
    ).to_parquet(str(uf))
    data = load_preference_data(str(tmp_path), "train")  # a folder holding <split>.parquet
    assert list(data) == [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "chosen": "g2", "rejected": "b2"},
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match=r"unknown layout.*question"):
        load_preference_data(str(bad))
    with pytest.raises(FileNotFoundError):
        load_preference_data(str(tmp_path / "missing.jsonl"))


def test_split_preference():
    rows = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    split = split_preference(rows, j_size=3, eval_size=2, seed=1)
    assert (len(split.j), len(split.eval), len(split.candidates)) == (3, 2, 5)
    used = {r["prompt"] for r in split.j + split.eval} | {c["prompt"] for c in split.candidates}
    assert len(used) == 10
    assert all(c["response"].startswith("r") for c in split.candidates)
    assert all(r["response"].startswith("c") for r in split.retain)
    with pytest.raises(ValueError, match="J set"):
        split_preference(rows, j_size=0, eval_size=2)
    with pytest.raises(ValueError, match="at least one candidate"):
        split_preference(rows, j_size=8, eval_size=2)


def test_synthetic_task():
    a, b = synthetic_preference_task(3), synthetic_preference_task(3)
    assert a == b and a != synthetic_preference_task(4)
    kinds = [c["kind"] for c in a.candidates]
    assert (kinds.count("bad"), kinds.count("decoy"), kinds.count("neutral")) == (32, 16, 16)
    chosen = {p["chosen"] for p in a.j}
    assert all(c["response"] in chosen for c in a.candidates if c["kind"] == "decoy")
    assert all(synthetic_reward(p["chosen"]) == 1 and synthetic_reward(p["rejected"]) == -1 for p in a.eval)
    with pytest.raises(ValueError, match="num_decoy"):
        synthetic_preference_task(num_j=2, num_decoy=3)


# ------------------------------------------------------------------------------ config, run


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match=r"bilevel\.nope"):
        u2a.load_u2a_config(None, ["bilevel.nope=1"])
    with pytest.raises(ConfigError, match=r"bilevel\.score_method"):
        u2a.load_u2a_config(None, ["bilevel.score_method=magic"])
    with pytest.raises(ConfigError, match=r"data\.j_size"):
        u2a.load_u2a_config(None, ["data.j_size=0"])


def test_run_u2a_end_to_end(tmp_path):
    out = tmp_path / "run"
    overrides = [
        *TINY,
        "model.sft_epochs=3",
        "bilevel.k=6",
        "bilevel.outer_iterations=1",
        "bilevel.inner.epochs=1",
        "run.reward_prompts=2",
        "run.max_new_tokens=6",
        f"run.output_dir={out}",
        f"run.cache_dir={tmp_path / 'cache'}",
    ]
    lines = []
    summary = u2a.run_u2a(None, overrides, log=lines.append)
    saved = json.loads((out / "results.json").read_text())
    assert (out / "u2a.png").stat().st_size > 0
    assert len(saved["history"]) == 2 and len(saved["final_weights"]) == 16
    assert sum(saved["final_weights"]) == pytest.approx(6.0, rel=1e-5)
    assert {"pref_accuracy", "dpo_loss", "reward"} <= set(summary["eval"])
    assert math.isfinite(summary["j"][-1])
    assert any("outer 1/1" in line for line in lines) and any("w = 0" in line for line in lines)
    assert list((tmp_path / "cache").iterdir())  # reference log-probs went through refcache


def test_run_u2a_on_a_local_preference_file(tmp_path):
    # The real-data path (no synthetic kinds, no reward): PKU-style rows from a local file.
    rows = [
        {
            "prompt": f"Question {i}?",
            "response_0": f"Kind answer {i}.",
            "response_1": f"Rude answer {i}!",
            "safer_response_id": 0,
        }
        for i in range(12)
    ]
    source = tmp_path / "pku.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = [
        f"data.source={source}",
        "data.j_size=3",
        "data.eval_size=2",
        "model.hidden_size=32",
        "model.num_hidden_layers=1",
        "model.vocab_size=300",
        "bilevel.k=3",
        "bilevel.outer_iterations=1",
        "bilevel.inner.epochs=1",
        "run.plot=false",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    summary = u2a.run_u2a(None, overrides, log=lambda message: None)
    assert summary["final_weight_by_kind"]["unknown"]["selected"] == 3
    assert "reward" not in summary["eval"] and "pref_accuracy" in summary["eval"]
