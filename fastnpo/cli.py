"""The `fastnpo` command: one parser per subcommand, one function per subcommand (COMMANDS)."""

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnpo", description="Fast, memory-lean LLM unlearning.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="unlearn (or fine-tune) a causal LM; torchrun for several processes"
    )
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=2e-5")

    cache = commands.add_parser("cache-ref", help="compute (or reuse) the reference log-prob cache only")
    cache.add_argument("--config", required=True)
    cache.add_argument(
        "--verify", type=int, default=0, metavar="N", help="recompute N examples per set and compare"
    )
    cache.add_argument("overrides", nargs="*")

    u2a = commands.add_parser("u2a", help="U2A: choose and weight the negatives to unlearn (bi-level)")
    u2a.add_argument("--config", default=None, help="YAML file, e.g. configs/u2a_synthetic.yaml")
    u2a.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. bilevel.k=16")

    demo = commands.add_parser("demo", help="the TOFU unlearning study on Mini-TOFU and a tiny model (CPU)")
    demo.add_argument("--preset", default="default", help="quick (smoke test), default (~10 min on 2 cores), full")
    demo.add_argument("--out", default="runs/demo", help="work folder (replaced)")
    demo.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser("eval", help="TOFU metrics of a model on TOFU-schema data")
    evaluate.add_argument("--model", required=True, help="model folder or hub name")
    evaluate.add_argument("--data", required=True, help="folder of <split>.jsonl files, or a hub name (locuslab/TOFU)")
    evaluate.add_argument("--forget-split", default="forget10")
    evaluate.add_argument("--retain-stats", help="JSON written by an earlier `fastnpo eval` of the retain model")
    evaluate.add_argument("--template", default="[INST] {question} [/INST]")
    evaluate.add_argument("--out", help="write the full report (per-example values included) here")

    prepare = commands.add_parser("prepare-tiny", help="write Mini-TOFU data and a random tiny model (offline)")
    prepare.add_argument("--out", default="runs/tiny")
    prepare.add_argument("--seed", type=int, default=0)
    return parser


# Each command imports what it needs when it runs: `fastnpo --help` stays fast.


def run_train(args) -> dict:
    from .train import load_config, train

    return train(load_config(args.config, args.overrides))


def run_cache_ref(args) -> dict:
    from .train import build_reference_cache, load_config

    return build_reference_cache(load_config(args.config, args.overrides), verify=args.verify)


def run_u2a(args) -> dict:
    from .u2a import run_u2a as u2a

    return u2a(args.config, args.overrides)


def run_demo(args) -> dict:
    from .tofu.demo import run_demo as demo

    results = demo(args.out, args.preset, args.seed)
    return {"out": args.out, "timings_s": results["timings_s"]}


def run_eval(args) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fastnpo eval runs on one process: launch it without torchrun")
    from .tofu.evaluate import EvalConfig, evaluate_path, summary

    retain = json.loads(open(args.retain_stats).read()) if args.retain_stats else None
    config = EvalConfig(data=args.data, forget_split=args.forget_split, template=args.template)
    report = evaluate_path(args.model, config, retain)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    return summary(report)


def run_prepare_tiny(args) -> dict:
    from .tofu.minitofu import prepare_tiny

    return {k: str(v) for k, v in prepare_tiny(args.out, seed=args.seed).items()}


COMMANDS = {
    "train": run_train,
    "cache-ref": run_cache_ref,
    "u2a": run_u2a,
    "demo": run_demo,
    "eval": run_eval,
    "prepare-tiny": run_prepare_tiny,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        result = COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError, NotImplementedError) as error:
        if os.environ.get("FASTNPO_DEBUG"):
            raise
        print(f"fastnpo {args.command}: error: {error}", file=sys.stderr)
        print("(set FASTNPO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
