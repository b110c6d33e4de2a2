#!/usr/bin/env python
"""U2A side by side with its baselines on one prepared task per seed (same base model, same data).

    .venv/bin/python benchmarks/bench_u2a_compare.py --config configs/u2a_synthetic.yaml \\
        --compare u2a uniform uniform_equal_steps random u2a_authors_sign --seeds 0 1 2 \\
        --out benchmarks/results/u2a_comparison

Without --compare it is a single `fastnpo u2a` run. With --out, writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine_record

from fastnpo import u2a

VARIANTS = {
    "u2a": [],
    "uniform": ["bilevel.selection=uniform"],
    "random": ["bilevel.selection=random"],
    # The authors' loop: top-k by score, weights multiplied by exp(-eta * score).
    "u2a_authors_sign": ["bilevel.select_by=score", "bilevel.sign=-1"],
    # Every candidate, with inner.epochs scaled by k / N: as many inner steps as u2a / random.
    "uniform_equal_steps": ["bilevel.selection=uniform"],
}


def _row(name: str, seed: int, result: dict) -> dict:
    first, last = result["history"][0], result["history"][-1]
    return {
        "variant": name,
        "seed": seed,
        "j_start": first["j"],
        "j_end": last["j"],
        "j_path": [h["j"] for h in result["history"]],
        "eval_start": first["metrics"],
        "eval_end": last["metrics"],
        "selected_by_kind": {k: v["selected"] for k, v in result["final_weight_by_kind"].items()},
        "weight_by_kind": {k: v["sum"] for k, v in result["final_weight_by_kind"].items()},
        "inner_steps": sum(h["inner"]["steps"] for h in result["history"][1:]),
        "seconds": result["seconds"],
    }


def compare_selections(
    config_path=None,
    overrides=(),
    *,
    variants=("u2a", "uniform", "random"),
    seeds=(0,),
    log: Callable[[str], None] = print,
) -> dict:
    """Each variant from the same prepared task (same base model and data) per seed."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    rows = []
    for seed in seeds:
        base = u2a.load_u2a_config(config_path, [*overrides, f"run.seed={seed}"])
        if base.run.threads > 0:
            torch.set_num_threads(base.run.threads)
        torch.manual_seed(seed)
        task = u2a.prepare_task(base, log)
        for name in variants:
            extra = list(VARIANTS[name])
            if name == "uniform_equal_steps":
                epochs = base.bilevel.inner.epochs * base.bilevel.k / len(task.split.candidates)
                extra.append(f"bilevel.inner.epochs={max(1, round(epochs))}")
            config = u2a.load_u2a_config(config_path, [*overrides, f"run.seed={seed}", *extra])
            torch.manual_seed(seed)
            result = u2a.run_prepared(config, copy.deepcopy(task), log=lambda message: None)
            row = _row(name, seed, result)
            rows.append(row)
            end = ", ".join(f"{k} {v:.3f}" for k, v in row["eval_end"].items())
            log(
                f"[u2a] seed {seed} {name:>16}: J {row['j_start']:.4f} -> {row['j_end']:.4f} | {end} | "
                f"selected {row['selected_by_kind']}"
            )
    return {"rows": rows, "machine": machine_record(), "overrides": list(overrides), "config": str(config_path)}


def comparison_markdown(result: dict) -> str:
    """Mean (min..max over seeds) per variant: J after the first and the last outer iteration,
    the held-out metrics at the end, inner steps and the final selection by kind; the first
    row is the starting (= reference) model."""
    rows = result["rows"]
    keys = [
        k
        for k in ("pref_accuracy", "logp_accuracy", "dpo_loss", "reward", "chosen_logp", "rejected_logp")
        if rows and k in rows[0]["eval_end"]
    ]

    def cell(values, digits=3):
        mean = sum(values) / len(values)
        if len(values) == 1 or max(values) == min(values):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"

    lines = [
        "| variant | seeds | J after outer 1 | J end | "
        + " | ".join(f"held-out {k}" for k in keys)
        + " | inner steps | selected at the end |",
        "|---" * (len(keys) + 6) + "|",
    ]
    firsts = {r["seed"]: r for r in rows}.values()
    lines.append(
        f"| start (reference model) | {len(firsts)} | - | {cell([r['j_start'] for r in firsts], 4)} | "
        + " | ".join(cell([r["eval_start"][k] for r in firsts]) for k in keys)
        + " | 0 | - |"
    )
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        kinds = {k: cell([r["selected_by_kind"][k] for r in mine], 1) for k in mine[0]["selected_by_kind"]}
        lines.append(
            f"| {name} | {len(mine)} | {cell([r['j_path'][1] for r in mine], 4)} | "
            f"{cell([r['j_end'] for r in mine], 4)} | "
            + " | ".join(cell([r["eval_end"][k] for r in mine]) for k in keys)
            + f" | {cell([r['inner_steps'] for r in mine], 0)} | "
            + ", ".join(f"{k} {v}" for k, v in kinds.items())
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument(
        "--compare",
        nargs="*",
        default=None,
        metavar="VARIANT",
        help=f"run variants side by side ({', '.join(VARIANTS)}; none given = u2a uniform random)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default=None, help="comparison: write OUT.json and OUT.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.compare is None:
        print(json.dumps(u2a.run_u2a(args.config, args.overrides), indent=1))
        return 0
    result = compare_selections(
        args.config, args.overrides, variants=args.compare or ("u2a", "uniform", "random"), seeds=args.seeds
    )
    table = comparison_markdown(result)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
