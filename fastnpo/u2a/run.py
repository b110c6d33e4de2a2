"""A U2A run: the config tree, the task (split, tokenizer, starting model), the loop with its
log and plot, and `fastnpo u2a` (run_u2a)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ..config import ConfigError, load_structured, require
from ..data.preference import load_preference_data
from ..files import check_new_folder
from ..modeling import DTYPES, LoraConfig, add_lora, load_causal_lm, load_tokenizer
from . import preference as pref
from .bilevel import BilevelConfig, check_bilevel, run_bilevel
from .problem import UNLEARN_LOSSES, ObjectiveConfig, PreferenceUnlearningProblem
from .training import supervised_finetune


@dataclass
class U2AModelConfig:
    """name_or_path: a causal LM (hub name or folder); "" builds a tiny Llama (fastnpo.tiny)
    with a BPE tokenizer trained on the data, then fine-tunes it on the task's sft texts
    (sft_epochs) so there is something to unlearn. lora: train LoRA adapters only."""

    name_or_path: str = ""
    tokenizer: str = ""
    dtype: str = "float32"
    impl: str = "auto"
    attn_implementation: str = "sdpa"
    lora: LoraConfig = field(default_factory=LoraConfig)
    vocab_size: int = 400
    hidden_size: int = 64
    num_hidden_layers: int = 2
    sft_epochs: int = 25
    sft_lr: float = 3e-3
    sft_batch_size: int = 16


@dataclass
class U2ADataConfig:
    """source: "synthetic" (preference.synthetic_preference_task) or a preference data set
    (fastnpo.data.preference.load_preference_data). j_size / eval_size / max_candidates: the split of a
    real set; num_*: the synthetic task's sizes."""

    source: str = "synthetic"
    split: str = "train"
    preference_key: str = ""
    j_size: int = 24
    eval_size: int = 24
    max_candidates: int = 0
    num_bad: int = 32
    num_decoy: int = 16
    num_neutral: int = 16
    template: str = "[INST] {question} [/INST]"
    max_length: int = 96
    batch_size: int = 32


@dataclass
class U2ARunConfig:
    """threads: torch CPU threads (0 = torch's default; 1 is fastest on a busy 2-core machine).
    reward_prompts: evaluation prompts answered greedily and scored by the synthetic reward.
    cache_dir: keep the reference log-probs on disk too (refcache; "" = in memory only).
    overwrite: a non-empty output_dir is refused unless true (as `fastnpo train`'s run.overwrite)."""

    output_dir: str = "runs/u2a"
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    cache_dir: str = ""
    plot: bool = True
    reward_prompts: int = 16
    max_new_tokens: int = 24


@dataclass
class U2AConfig:
    model: U2AModelConfig = field(default_factory=U2AModelConfig)
    data: U2ADataConfig = field(default_factory=U2ADataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    run: U2ARunConfig = field(default_factory=U2ARunConfig)


def load_u2a_config(path=None, overrides=()) -> U2AConfig:
    """Defaults <- YAML <- dotted overrides; ConfigError naming the key for unknown keys,
    wrong types and bad values."""
    config = load_structured(U2AConfig, path, overrides)
    o, d = config.objective, config.data
    require(o.unlearn in UNLEARN_LOSSES, "objective.unlearn", f"must be one of {UNLEARN_LOSSES}", o.unlearn)
    require(o.npo_beta > 0, "objective.npo_beta", "must be > 0", o.npo_beta)
    require(o.dpo_beta > 0, "objective.dpo_beta", "must be > 0", o.dpo_beta)
    require(o.dpo_scale > 0, "objective.dpo_scale", "must be > 0", o.dpo_scale)
    require(d.j_size >= 1, "data.j_size", "must be >= 1 (U2A needs a J set)", d.j_size)
    require(d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size)
    require(config.model.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}", config.model.dtype)
    check_bilevel(config.bilevel)
    return config


# ------------------------------------------------------------------------------ the task


@dataclass
class PreparedTask:
    model: nn.Module
    tokenizer: object
    split: pref.PreferenceSplit
    synthetic: bool


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _load_split(d: U2ADataConfig, seed: int) -> pref.PreferenceSplit:
    if d.source == "synthetic":
        sizes = dict(num_bad=d.num_bad, num_decoy=d.num_decoy, num_neutral=d.num_neutral)
        split = pref.synthetic_preference_task(seed, num_j=d.j_size, num_eval=d.eval_size, **sizes)
    else:
        data = load_preference_data(d.source, d.split, preference_key=d.preference_key)
        sizes = dict(j_size=d.j_size, eval_size=d.eval_size, max_candidates=d.max_candidates)
        split = pref.split_preference(data, seed=seed, **sizes)
    split.check()
    return split


def _load_model(m: U2AModelConfig, split: pref.PreferenceSplit, template: str, seed: int):
    """(tokenizer, model): the named causal LM, or a tiny Llama and a BPE trained on the split."""
    if m.name_or_path:
        tokenizer = load_tokenizer(m.tokenizer or m.name_or_path)
        return tokenizer, load_causal_lm(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation)
    from ..tiny import TinyModelSpec, build_tiny_model

    tokenizer = pref.tokenizer_for(split, template=template, vocab_size=m.vocab_size)
    spec = TinyModelSpec(
        hidden_size=m.hidden_size,
        intermediate_size=m.hidden_size * 11 // 4,
        num_hidden_layers=m.num_hidden_layers,
        vocab_size=m.vocab_size,
    )
    return tokenizer, build_tiny_model(tokenizer, spec, seed)


def prepare_task(config: U2AConfig, log: Callable[[str], None] = print) -> PreparedTask:
    """The split, the tokenizer and the starting model (= the reference model)."""
    d, m, seed = config.data, config.model, config.run.seed
    split = _load_split(d, seed)
    tokenizer, model = _load_model(m, split, d.template, seed)
    model = model.to(_device(config.run.device))
    if split.sft and m.sft_epochs > 0:
        start = time.perf_counter()
        items = pref.encode_responses(
            tokenizer, split.sft, key="response", template=d.template, max_length=d.max_length
        )
        loss = supervised_finetune(
            model,
            items,
            pad_id=tokenizer.pad_token_id,
            epochs=m.sft_epochs,
            lr=m.sft_lr,
            batch_size=m.sft_batch_size,
            seed=seed,
        )
        took = time.perf_counter() - start
        log(f"[u2a] fine-tuned the base model on {len(split.sft)} texts: NLL {loss:.3f} ({took:.1f}s)")
    return PreparedTask(model, tokenizer, split, d.source == "synthetic")


# ------------------------------------------------------------------------- the run and its log


def weight_histogram(weights: list[float], kinds: list[str], bins: int = 5) -> str:
    """Text histogram of the candidates' weights, with the kinds in each bin."""
    top = max(weights) if weights else 0.0
    edges = [top * i / bins for i in range(bins + 1)]
    lines = []

    def line(label, members):
        by_kind = {k: sum(1 for i in members if kinds[i] == k) for k in dict.fromkeys(kinds)}
        detail = ", ".join(f"{k} {v}" for k, v in by_kind.items() if v)
        lines.append(f"    {label:>15} {'#' * len(members):<40} {len(members)}{f' ({detail})' if detail else ''}")

    line("w = 0", [i for i, w in enumerate(weights) if w == 0])
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i, w in enumerate(weights) if w > 0 and (lo < w <= hi or (b == 0 and w <= hi))]
        line(f"({lo:.2f}, {hi:.2f}]", members)
    return "\n".join(lines)


def _reporter(config: U2AConfig, kinds: list[str], log: Callable[[str], None]) -> Callable[[dict], None]:
    """run_bilevel's on_iteration: J, the held-out metrics and the selection by kind."""

    def report(entry: dict) -> None:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
        if entry["iteration"] == 0:
            log(f"[u2a] start: J {entry['j']:.4f} | held-out: {metrics}")
            return
        t, prev = entry["iteration"], entry["j_before"]
        chosen = {k: sum(1 for i in entry["selected"] if kinds[i] == k) for k in dict.fromkeys(kinds)}
        log(
            f"[u2a] outer {t}/{config.bilevel.outer_iterations}: J {prev:.4f} -> {entry['j']:.4f} | "
            f"selected {len(entry['selected'])}: {chosen} | {entry['inner']['steps']} inner steps"
        )
        log(f"[u2a]   held-out: {metrics}")
        if config.bilevel.selection != "uniform":
            log(f"[u2a]   selected indices: {entry['selected']}")
        log("[u2a]   weights:\n" + weight_histogram(entry["weights"], kinds))

    return report


def run_prepared(config: U2AConfig, task: PreparedTask, log: Callable[[str], None] = print) -> dict:
    """The bi-level loop on a prepared task (whose model it trains in place)."""
    model = task.model
    if config.model.lora.enabled:
        # At initialisation LoRA's B is zero: the wrapped model IS the original, so the
        # reference log-probs computed through it below are the original model's.
        model = add_lora(model, config.model.lora)
    d = config.data
    problem = PreferenceUnlearningProblem.from_split(
        model,
        task.tokenizer,
        task.split,
        config.objective,
        template=d.template,
        max_length=d.max_length,
        batch_size=d.batch_size,
        impl=config.model.impl,
        cache_dir=config.run.cache_dir,
    )
    kinds = [c.get("kind", "unknown") for c in task.split.candidates]
    prompts = [p["prompt"] for p in task.split.eval[: config.run.reward_prompts]]

    def evaluate() -> dict:
        metrics = problem.preference_metrics("eval")
        if task.synthetic and prompts:
            metrics["reward"], _ = pref.greedy_reward(
                model, task.tokenizer, prompts, template=d.template, max_new_tokens=config.run.max_new_tokens
            )
        return metrics

    start = time.perf_counter()
    report = _reporter(config, kinds, log)
    out = run_bilevel(problem, config.bilevel, seed=config.run.seed, evaluate=evaluate, on_iteration=report)
    by_kind = {
        k: [w for w, kk in zip(out["final_weights"], kinds, strict=True) if kk == k] for k in dict.fromkeys(kinds)
    }
    out.update(
        kinds=kinds,
        seconds=time.perf_counter() - start,
        final_weight_by_kind={
            k: {"count": len(v), "sum": sum(v), "selected": sum(1 for w in v if w > 0)} for k, v in by_kind.items()
        },
    )
    return out


def save_plot(result: dict, path: Path) -> None:
    """J, the held-out metrics per outer iteration and the final weights, coloured by kind; every
    panel says on its y axis what it measures and in which unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = result["history"]
    if not history:
        raise ValueError("result['history'] is empty: no outer iteration to plot")
    its = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(its, [h["j"] for h in history], "o-")
    axes[0].set(title="J (DPO loss on the J set)", xlabel="outer iteration", ylabel="DPO loss (nats, lower is better)")
    names = {
        "pref_accuracy": "preference accuracy (DPO margin > 0)",
        "logp_accuracy": "log-prob accuracy (chosen > rejected)",
    }
    for key, name in names.items():
        if key in history[0]["metrics"]:
            axes[1].plot(its, [h["metrics"][key] for h in history], "o-", label=name)
    axes[1].set(title="held-out metrics", xlabel="outer iteration", ylim=(-0.05, 1.05))
    axes[1].set_ylabel("fraction of held-out pairs")
    lines = axes[1].get_lines()
    if "reward" in history[0]["metrics"]:
        # The synthetic reward lives on [-1, 1]: its own axis, not the accuracies'.
        reward = axes[1].twinx()
        lines += reward.plot(
            its,
            [h["metrics"]["reward"] for h in history],
            "s--",
            color="tab:purple",
            label="mean reward of greedy answers",
        )
        reward.set(ylim=(-1.1, 1.1), ylabel="reward (-1 rude ... +1 polite)")
    axes[1].legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
    for ax in axes[:2]:
        ax.set_xticks(its)
    colors = {"bad": "tab:green", "decoy": "tab:red", "neutral": "tab:gray"}
    kinds, weights = result["kinds"], result["final_weights"]
    axes[2].bar(range(len(weights)), weights, color=[colors.get(k, "tab:blue") for k in kinds], width=1.0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors.get(k, "tab:blue")) for k in dict.fromkeys(kinds)]
    axes[2].legend(handles, list(dict.fromkeys(kinds)), title="candidate kind", fontsize=8)
    axes[2].set(
        title="final weights by candidate",
        xlabel="candidate",
        ylabel=f"weight w_i (no unit; they sum to {sum(weights):.3g})",
    )
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))  # candidate indices: no 2.5
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_u2a(config_path=None, overrides=(), log: Callable[[str], None] = print) -> dict:
    """`fastnpo u2a --config ...`: load the config, prepare the task, run the loop; writes
    results.json (and u2a.png) to run.output_dir and returns a summary dict."""
    config = load_u2a_config(config_path, overrides)
    out_dir = Path(config.run.output_dir)
    # Refused before any work, like `fastnpo train`: an earlier run's results are not replaced
    # silently, and a file or an unwritable folder is not a run.output_dir.
    try:
        check_new_folder(
            out_dir, name="run.output_dir", overwrite=config.run.overwrite, how_to_overwrite="set run.overwrite=true"
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = prepare_task(config, log)
    result = run_prepared(config, task, log)
    result["config"] = OmegaConf.to_container(OmegaConf.structured(config))
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    summary = {
        "output_dir": str(out_dir),
        "results": str(out_dir / "results.json"),
        "j": [h["j"] for h in result["history"]],
        "eval": result["history"][-1]["metrics"],
        "final_weight_by_kind": result["final_weight_by_kind"],
    }
    if config.run.plot:
        save_plot(result, out_dir / "u2a.png")
        summary["plot"] = str(out_dir / "u2a.png")
    return summary
