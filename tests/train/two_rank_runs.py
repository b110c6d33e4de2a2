"""Several training runs in ONE torchrun job (tests/train/test_train.py): each run is
fastnpo.train.train(config) on every rank, one after the other, over one process group, so the
per-method two-rank test pays torchrun's start-up and the imports once.

    python -m torch.distributed.run --nproc_per_node=2 tests/train/two_rank_runs.py RUNS.json

RUNS.json: a list of {"config": path or null, "overrides": ["key=value", ...]}; a run with
"stop_in_step": N is stopped by a KeyboardInterrupt at the start of its N-th step on every rank
(as Ctrl-C would), and the job goes on with the next run. With EAGER_COMPILE=1 in the
environment, torch.compile returns the function it is given (torchao's 8-bit step then runs
eagerly: the same arithmetic without seconds of compiling per shape on CPU).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import interrupted_in_step

from fastnpo import distributed
from fastnpo.train import setup, train
from fastnpo.train.config import load_config


def main(path: str) -> None:
    runs = json.loads(Path(path).read_text())
    if os.environ.get("EAGER_COMPILE") == "1":
        torch.compile = lambda fn=None, **options: fn
    dist.init_process_group(backend="gloo")
    # train() joins the job and leaves it (setup / teardown); here the group outlives each run.
    distributed.teardown = lambda: None
    # optim.offload runs on CPU only in tests (see test_train.py's offload_on_cpu).
    setup.OFFLOAD_DEVICES = ("cuda", "cpu")
    try:
        for run in runs:
            config = load_config(run["config"], run["overrides"])
            if "stop_in_step" in run:
                stopped_train(config, run["stop_in_step"])
            else:
                train(config)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def stopped_train(config, step: int) -> None:
    with interrupted_in_step(step):
        try:
            train(config)
        except KeyboardInterrupt:
            return
    raise AssertionError(f"the run ended before its step {step}")


if __name__ == "__main__":
    main(sys.argv[1])
