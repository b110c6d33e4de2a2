"""The `fastnpo` command."""

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
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

    args = parser.parse_args(argv)
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        if args.command == "train":
            from .train import train as run_training

            result = run_training(config)
        else:
            from .train import build_reference_cache

            result = build_reference_cache(config, verify=args.verify)
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
