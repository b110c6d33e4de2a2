"""The `fastnpo` command: one parser per subcommand, one function per subcommand (COMMANDS).

Nothing heavy is imported before argparse has run (each command imports what it needs), so
`fastnpo --help` and every `fastnpo <command> --help` answer in a fraction of a second.
"""

import argparse
import contextlib
import json
import os
import shlex
import sys

TRAIN_KEYS = """\
config keys (YAML sections, or dotted key=value overrides), defined as dataclasses in:
  model.*        ModelConfig        fastnpo/train/config.py (model.lora.*: LoraConfig, fastnpo/modeling.py)
  data.*         DataConfig         fastnpo/data/config.py
  method.*       MethodConfig       fastnpo/methods/__init__.py
  optim.*        OptimConfig        fastnpo/train/config.py
  distributed.*  DistributedConfig  fastnpo/train/sharding.py
  run.*          RunConfig          fastnpo/train/config.py
  eval.*         EpochEvalConfig    fastnpo/train/config.py (evaluation during training)
`fastnpo train --print-config [--config FILE] [key=value ...]` prints every key with its value
(defaults <- FILE <- overrides) and exits.
"""

U2A_KEYS = """\
config keys (sections model, data, objective, bilevel, run) are the dataclasses of
fastnpo/u2a/run.py (objective: fastnpo/u2a/problem.py, bilevel: fastnpo/u2a/bilevel.py);
`fastnpo u2a --print-config [--config FILE] [key=value ...]` prints them all with their values.
"""

DEMO_TIME = (
    "It runs on one thread: on the project's idle 2-core AMD EPYC (2026-12-05) the default preset's stages took "
    "3 min 22 s, and `make demo` in a fresh clone 4 min 28 s with its install; a busy machine takes several "
    "times longer (see docs/results.md, 'The demo')."
)


def _debug_flag() -> argparse.ArgumentParser:
    """--debug after the command name too (`fastnpo train --debug ...`); SUPPRESS keeps the
    subparser from resetting a --debug given before the command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parent


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train",
        parents=[_debug_flag()],
        help="unlearn (or fine-tune) a causal LM; torchrun for several processes",
        epilog=TRAIN_KEYS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file (see configs/); required unless --print-config")
    train.add_argument("--print-config", action="store_true", help="print the resolved config tree and exit")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=2e-5")


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[_debug_flag()],
        help="the TOFU unlearning study on Mini-TOFU and a tiny model (CPU)",
        description="Mini-TOFU, a tiny Llama, six unlearning methods, several unlearning seeds. " + DEMO_TIME,
    )
    demo.add_argument(
        "--preset",
        default="default",
        choices=("quick", "default", "full"),
        help="quick: a smoke run (21 s with its imports on that machine while it ran a test suite, 8 s of it the "
        "demo's stages); default: the published study; full: larger, not yet tuned",
    )
    demo.add_argument("--out", default="runs/demo", help="work folder; refused if it is not empty, see --overwrite")
    demo.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data, tokenizer, tiny model and fine-tuning (shared by all runs)",
    )
    demo.add_argument(
        "--unlearn-seeds",
        default=None,
        metavar="S,S,...",
        help="seeds of the unlearning runs (their data order); default: the preset's",
    )
    demo.add_argument(
        "--methods",
        default=None,
        metavar="M,M,...",
        help="unlearning methods instead of the preset's (default and quick: six; full: every method)",
    )
    demo.add_argument(
        "--benchmark",
        default="tofu",
        choices=("tofu", "muse"),
        help="muse: fine-tune -> unlearn -> evaluate on Mini-MUSE (docs/muse.md; presets quick and default)",
    )


def _add_cache_ref_parser(commands) -> None:
    cache = commands.add_parser(
        "cache-ref", parents=[_debug_flag()], help="compute (or reuse) the reference log-prob cache only"
    )
    cache.add_argument("--config", required=True, help="YAML file, as for `fastnpo train`")
    cache.add_argument("--verify", type=int, default=0, metavar="N", help="recompute N examples per set and compare")
    cache.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for `fastnpo train`")


def _add_make_alternates_parser(commands) -> None:
    alternates = commands.add_parser(
        "make-alternates",
        parents=[_debug_flag()],
        help="AltPO's alternate answers: the model's greedy answer per forget question (JSON lines)",
    )
    alternates.add_argument("--config", required=True, help="YAML file, as for `fastnpo train` (model.*, data.*)")
    alternates.add_argument("--out", required=True, help="the JSON-lines file to write (then data.alternate=<it>)")
    alternates.add_argument("--max-new-tokens", type=int, default=64, help="longest alternate answer (default 64)")
    alternates.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    alternates.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for `fastnpo train`")


def _add_u2a_parser(commands) -> None:
    u2a = commands.add_parser(
        "u2a",
        parents=[_debug_flag()],
        help="U2A: choose and weight the negatives to unlearn (bi-level)",
        epilog=U2A_KEYS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u2a.add_argument("--config", default=None, help="YAML file, e.g. configs/u2a_synthetic.yaml")
    u2a.add_argument("--print-config", action="store_true", help="print the resolved config tree and exit")
    u2a.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. bilevel.k=16 run.overwrite=true")


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", parents=[_debug_flag()], help="TOFU metrics of a model on TOFU-schema data")
    evaluate.add_argument("--model", required=True, help="model folder or hub name")
    evaluate.add_argument(
        "--benchmark",
        default="tofu",
        choices=("tofu", "muse"),
        help="muse: --data is muse-bench/MUSE-News, muse-bench/MUSE-Books or a local folder in that layout; "
        "--retain-stats: the retrained model's `--benchmark muse --out` JSON (docs/muse.md)",
    )
    evaluate.add_argument("--data", required=True, help="folder of <split>.jsonl files, or a hub name (locuslab/TOFU)")
    evaluate.add_argument("--forget-split", default="forget10", help="forget01, forget05 or forget10")
    evaluate.add_argument("--retain-stats", help="JSON written by an earlier `fastnpo eval` of the retain model")
    evaluate.add_argument("--template", default="[INST] {question} [/INST]", help="prompt format string")
    evaluate.add_argument("--out", help="write the full report (per-example values included) here")
    evaluate.add_argument(
        "--plot",
        metavar="PATH",
        help="write the bar chart of the TOFU numbers (per set probability, truth ratio, ROUGE-L; model utility, "
        "forget quality; beside the retain model's with --retain-stats) here (default: --out with .png in place of "
        "its suffix, e.g. --out npo.json -> npo.png; without --out, no chart unless --plot is given)",
    )
    evaluate.add_argument("--no-plot", action="store_true", help="write no bar chart, even with --out")
    evaluate.add_argument(
        "--attacks",
        default="",
        help="membership-inference attacks to add, comma-separated, or 'all': mia_loss, mia_zlib, mia_min_k, "
        "mia_min_k_plus_plus, mia_reference (needs --reference-stats), mia_gradnorm (docs/evaluation.md)",
    )
    evaluate.add_argument(
        "--holdout-split", default="", help="the never-trained-on set of privleak (default: holdout01/05/10 to match)"
    )
    evaluate.add_argument(
        "--reference-stats", help="JSON of an earlier `fastnpo eval --out` of mia_reference's reference model"
    )
    evaluate.add_argument(
        "--no-privacy", action="store_true", help="skip privleak, extraction strength and exact memorization"
    )


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser(
        "plan",
        parents=[_debug_flag()],
        help="will it fit? per-GPU peak memory of a run by component (no weights loaded)",
        description="Predicts the per-GPU peak memory of a training run from its config, building the model "
        "on the meta device (docs/will_it_fit.md). The dtype is model.dtype; its default, auto, is the "
        "model's config.json dtype (torch_dtype), else float32, as `fastnpo train` loads it. "
        "Exit status: 0 when the run fits, 3 when it "
        "does not (the table, or the JSON with --json, is printed either way), 2 for a bad config or argument.",
    )
    add_plan_arguments(plan)


def _add_prepare_tiny_parser(commands) -> None:
    prepare = commands.add_parser(
        "prepare-tiny",
        parents=[_debug_flag()],
        help="write Mini-TOFU data and a random tiny model (offline)",
        description="Writes <out>/data (Mini-TOFU: every TOFU split as <split>.jsonl) and <out>/base (a random "
        "tiny Llama and its BPE tokenizer), the inputs of configs/tiny_cpu.yaml.",
    )
    prepare.add_argument("--out", default="runs/tiny", help="folder to write data/ and base/ into (default runs/tiny)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the data, the tokenizer and the model weights")
    prepare.add_argument("--overwrite", action="store_true", help="replace the data/ and base/ that --out holds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnpo", description="Fast, memory-lean LLM unlearning.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (same as FASTNPO_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    # The order here is the order `fastnpo --help` lists the commands in.
    _add_train_parser(commands)
    _add_cache_ref_parser(commands)
    _add_make_alternates_parser(commands)
    _add_u2a_parser(commands)
    _add_demo_parser(commands)
    _add_eval_parser(commands)
    _add_plan_parser(commands)
    _add_prepare_tiny_parser(commands)
    return parser


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a run config (YAML); default: the built-in defaults")
    parser.add_argument(
        "--model",
        default=None,
        help="hub name or local folder with config.json "
        "(overrides model.name_or_path; e.g. meta-llama/Llama-3.1-8B works offline)",
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory per GPU in GiB (default: the config's run.gpu_memory_gib, else the visible GPU's, else 80)",
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (FSDP2 when > 1 in all)")
    parser.add_argument("--gpus-per-node", dest="gpus", type=int, help="the same as --gpus, in multi-node terms")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (plans memory and communication per GPU)")
    parser.add_argument(
        "--intra-node-gbps",
        type=float,
        default=3600.0,
        help="link rate within a node, Gb/s each way per GPU (default 3600: NVLink 4, H100/H200 SXM)",
    )
    parser.add_argument(
        "--inter-node-gbps",
        type=float,
        default=400.0,
        help="network rate across nodes, Gb/s each way per GPU (default 400: one NDR InfiniBand NIC per GPU)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON only")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.batch_size=4")


# Each command imports what it needs when it runs: `fastnpo --help` stays fast.


def run_plan(args) -> dict:
    """Print the plan (unless --json) and return it; result["fits"] decides the exit status."""
    from .config import load_structured
    from .train.config import Config
    from .train.memory_plan import plan

    config = load_structured(Config, args.config, args.overrides)
    result = plan(
        config,
        model=args.model,
        gpu_gib=args.gpu_memory,
        gpus=args.gpus,
        nodes=args.nodes,
        intra_node_gbps=args.intra_node_gbps,
        inter_node_gbps=args.inter_node_gbps,
    )
    if not args.json:
        print(format_plan(result))
    return result


def format_plan(result: dict) -> str:
    """`fastnpo plan`'s table of a memory_plan.plan() result."""
    from .train.communication import format_communication

    s, shape = result["settings"], result["shape"]
    world = (
        f"{s['gpus']} GPU{'s' if s['gpus'] > 1 else ''} x {result['gpu_memory_gib']:.1f} GiB "
        f"({result['gpu_memory_source']})"
    )
    fsdp = "FSDP2" if s["sharded"] else "no FSDP"
    trainable = result["trainable_params"]
    lines = [
        f"fastnpo plan: {result['model']} ({shape['params'] / 1e9:.2f} B parameters, "
        f"{trainable / 1e9:.3g} B trainable), {world}, {fsdp}",
        f"  {result['method']}, model.dtype={s['dtype']} ({result['dtype_source']}), "
        f"mixed_precision={s['mixed_precision']}, "
        f"micro-batch {s['rows']} rows x {s['seq_len']} tokens, activation checkpointing "
        f"{'on' if s['activation_checkpointing'] else 'off'}",
        "",
        f"  {'component (per GPU)':<34}{'GiB':>8}",
    ]
    for name, gib in result["components_gib"].items():
        if gib or name in ("parameters", "gradients", "optimizer state", "activations", "fused log-prob op"):
            lines.append(f"  {name:<34}{gib:>8.2f}")
    a = result["activations_gib"]
    lines.append(
        f"    (activations: {a['with_checkpointing']:.2f} with checkpointing, {a['without_checkpointing']:.2f} without)"
    )
    lines.append(f"  {'reference cache (GPU)':<34}{0.0:>8.2f}   fp32 per example, kept in host memory")
    lines.append(f"  {'CUDA context, NCCL, fragmentation':<34}{result['overhead_gib']:>8.2f}")
    if result["host_memory_gib"]:
        lines.append(f"  {'CPU memory per process (offload)':<34}{result['host_memory_gib']:>8.2f}   not GPU memory")
    lines.append("")
    lines.append(f"  peak allocated at '{result['peak_phase']}': {result['allocated_gib']:.2f} GiB")
    for phase, gib in result["phases_gib"].items():
        lines.append(f"    {phase:<40}{gib:>8.2f}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(
        f"  total {result['total_gib']:.2f} GiB of {result['gpu_memory_gib']:.1f} GiB: {verdict} "
        f"({result['headroom_gib']:+.2f} GiB)"
    )
    for item in result["suggestions"]:
        lines.append(f"  {item}" if item.startswith("budget:") else f"  would fit: {item}")
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result["hybrid"]:
        h = result["hybrid"]
        lines.append(
            f"  hybrid sharding: {h['replicas']} replicas x {h['shard_size']} shards; memory per GPU as sharded over "
            f"{h['shard_size']}"
        )
    if result["communication"]:
        lines.append("")
        where = f"{result['nodes']} node(s) x {result['gpus_per_node']} GPUs"
        lines.append(f"  {where}, " + format_communication(result["communication"]).replace("\n", "\n  "))
    return "\n".join(lines)


def run_train(args):
    from .config import to_yaml
    from .train import load_config, train

    if args.config is None and not args.print_config:
        raise ValueError("--config is required (or --print-config to see the keys)")
    config = load_config(args.config, args.overrides)
    if args.print_config:
        return to_yaml(config)
    with _second_ctrl_c_kills():
        if config.eval.every_epoch:
            from .tofu.evaluate import epoch_evaluator

            return train(config, evaluator=epoch_evaluator)
        return train(config)


@contextlib.contextmanager
def _second_ctrl_c_kills():
    """The first Ctrl-C raises KeyboardInterrupt as usual (the run stops, cleans up, and main
    says where in one line); from then on Ctrl-C has the default action: a second one kills at
    once. Left alone when SIGINT is not Python's handler (ignored, or someone else's)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(command: str, argv: list[str], stop: KeyboardInterrupt) -> str:
    """The line Ctrl-C ends a command with. `fastnpo train`: the step reached, the newest
    checkpoint, and the command that resumes (the same one: run.resume=true is the default)."""
    if command != "train":
        return "interrupted"
    again = list(argv)
    checkpoint = getattr(stop, "checkpoint", None)
    if checkpoint is not None and not getattr(stop, "resume", True):
        again = [a for a in again if not a.startswith("run.resume=")] + ["run.resume=true"]
    rerun = "fastnpo " + shlex.join(again)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rerun = f"the same torchrun command ({rerun})"
    if getattr(stop, "step", None) is None:  # before train() wrote anything
        return f"interrupted before the first step; to try again, run: {rerun}"
    action = "to resume from it" if checkpoint is not None else "to start over"
    return f"{stop}; {action}, run: {rerun}"


def run_cache_ref(args) -> dict:
    from .train import build_reference_cache, load_config

    return build_reference_cache(load_config(args.config, args.overrides), verify=args.verify)


def run_make_alternates(args) -> dict:
    from .train import load_config
    from .train.alternates import write_alternates

    config = load_config(args.config, args.overrides)
    return write_alternates(config, args.out, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite)


def run_u2a(args):
    from .u2a import run_u2a as u2a

    if args.print_config:
        from .config import to_yaml
        from .u2a.run import load_u2a_config

        return to_yaml(load_u2a_config(args.config, args.overrides))
    return u2a(args.config, args.overrides)


def run_demo(args) -> dict:
    from .files import OVERWRITE_OPTION, check_new_folder

    # The demo's own rule (tofu/demo.py), checked before its imports (torch: seconds).
    check_new_folder(args.out, name="--out", overwrite=args.overwrite, how_to_overwrite=OVERWRITE_OPTION)
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    if args.benchmark == "muse":
        if args.unlearn_seeds is not None or args.preset == "full":
            raise ValueError("--benchmark muse takes --preset quick or default, and no --unlearn-seeds")
        from .muse.demo import run_muse_demo

        preset = {"quick": "tiny"}.get(args.preset, args.preset)
        results = run_muse_demo(args.out, preset, args.seed, methods=methods, overwrite=args.overwrite)
        return {"out": args.out, "timings_s": results["timings_s"]}
    from .tofu.demo import run_demo as demo

    seeds = None if args.unlearn_seeds is None else [int(s) for s in args.unlearn_seeds.split(",")]
    results = demo(args.out, args.preset, args.seed, unlearn_seeds=seeds, methods=methods, overwrite=args.overwrite)
    return {"out": args.out, "timings_s": results["timings_s"], "cpu_s": results["cpu_s"]}


def _run_muse_eval(args) -> dict:
    tofu_only = {
        "--attacks": args.attacks,
        "--holdout-split": args.holdout_split,
        "--reference-stats": args.reference_stats,
    }
    given = [flag for flag, value in tofu_only.items() if value]
    if given:
        raise ValueError(f"{', '.join(given)}: TOFU evaluation options, not for --benchmark muse")
    from .muse.evaluate import MuseEvalConfig, evaluate_muse_path
    from .muse.evaluate import summary as muse_summary

    retain = json.loads(open(args.retain_stats).read()) if args.retain_stats else None
    config = MuseEvalConfig(privacy=not args.no_privacy)
    report = evaluate_muse_path(args.model, args.data, config, retain_report=retain)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    return muse_summary(report)


def run_eval(args) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fastnpo eval runs on one process: launch it without torchrun")
    from pathlib import Path

    from .files import check_model_source

    check_model_source(args.model, "--model")  # in a second, before the imports and the hub client's retries
    if args.benchmark == "muse":
        return _run_muse_eval(args)
    from .tofu.evaluate import EvalConfig, add_forget_quality, evaluate_path, summary

    # The chart: --plot, else beside --out (same stem, .png), else none.
    plot = None if args.no_plot else Path(args.plot) if args.plot else Path(args.out) if args.out else None
    if plot is not None and not args.plot:
        plot = plot.with_suffix(".png") if plot.suffix != ".png" else plot.with_name(plot.name + ".png")
    # Checked before the (long) evaluation, not when the chart is written after it.
    if plot is not None and not plot.parent.is_dir():
        raise FileNotFoundError(f"cannot write the chart {plot}: its folder does not exist (set --plot, or --no-plot)")
    retain = json.loads(open(args.retain_stats).read()) if args.retain_stats else None
    reference = json.loads(open(args.reference_stats).read()) if args.reference_stats else None
    from .tofu.privacy import ATTACKS

    attacks = ATTACKS if args.attacks.strip() == "all" else tuple(a for a in args.attacks.split(",") if a.strip())
    attacks = tuple(a.strip() for a in attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"--attacks {unknown} unknown; choose from {', '.join(ATTACKS)} or 'all'")
    if args.no_privacy and (attacks or args.holdout_split):
        raise ValueError("--no-privacy leaves no holdout evaluation for --attacks / --holdout-split")
    if "mia_reference" in attacks and reference is None:
        raise ValueError("--attacks mia_reference needs --reference-stats (the reference model's eval JSON)")
    config = EvalConfig(
        data=args.data,
        forget_split=args.forget_split,
        template=args.template,
        privacy=not args.no_privacy,
        holdout_split=args.holdout_split,
        attacks=attacks,
    )
    report = evaluate_path(args.model, config, retain, reference_report=reference)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    result = summary(report)
    if plot is not None:
        from .tofu.plots import plot_eval

        reports = {f"evaluated: {args.model}": result}
        if retain is not None:
            # The retain model against itself: forget quality 1 (the same truth ratios), computed, not assumed.
            reports[f"retain model: {Path(args.retain_stats).name}"] = summary(add_forget_quality(dict(retain), retain))
        plot_eval(reports, plot, title=f"TOFU evaluation of {args.model} ({args.forget_split})")
        result["plot"] = str(plot)
    return result


def run_prepare_tiny(args) -> dict:
    from .tofu.minitofu import prepare_tiny

    return {k: str(v) for k, v in prepare_tiny(args.out, seed=args.seed, overwrite=args.overwrite).items()}


COMMANDS = {
    "train": run_train,
    "cache-ref": run_cache_ref,
    "make-alternates": run_make_alternates,
    "u2a": run_u2a,
    "demo": run_demo,
    "eval": run_eval,
    "prepare-tiny": run_prepare_tiny,
    "plan": run_plan,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help answers before anything is imported
    from .console import quiet_third_party

    quiet_third_party()
    debug = args.debug or bool(os.environ.get("FASTNPO_DEBUG"))
    from .config import ConfigError

    try:
        result = COMMANDS[args.command](args)
    # OSError: a file missing or in the way, a permission, a full disk: each says which file
    except (ConfigError, OSError, ValueError, NotImplementedError) as error:
        if debug:
            raise
        # Under torchrun a config error is every rank's: said once, by rank 0. Anything else may be one
        # rank's own (its disk, its file): each rank says it, naming itself.
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == 0 or not isinstance(error, ConfigError):
            who = f" (rank {rank})" if world > 1 and not isinstance(error, ConfigError) else ""
            print(f"fastnpo {args.command}: error{who}: {error}", file=sys.stderr)
            print("(run with --debug, or set FASTNPO_DEBUG=1, for the traceback)", file=sys.stderr)
        else:  # torchrun stops every rank once one exits: leave rank 0 the moment to say it
            import time

            time.sleep(1.0)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C: one line, the shell's exit status for SIGINT
        if debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fastnpo {args.command}: {_interrupted(args.command, _argv(argv), stop)}", file=sys.stderr)
        return 130
    # `plan` has printed its table; its JSON only with --json.
    if int(os.environ.get("RANK", "0")) == 0 and (args.command != "plan" or args.json):
        # --print-config answers YAML; every other command a one-line JSON summary.
        print(result if isinstance(result, str) else json.dumps(result))
    if args.command == "plan" and not result["fits"]:
        from .train.memory_plan import EXIT_DOES_NOT_FIT  # 3, as the plan parser's description says

        return EXIT_DOES_NOT_FIT
    return 0


def _argv(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


if __name__ == "__main__":
    sys.exit(main())
