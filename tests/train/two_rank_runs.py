"""Several training runs in ONE torchrun job (tests/train/test_train.py): each run is
fastnpo.train.train(config) on every rank, one after the other, over one process group, so the
per-method two-rank test pays torchrun's start-up and the imports once.

    python -m torch.distributed.run --nproc_per_node=2 tests/train/two_rank_runs.py RUNS.json

RUNS.json: a list of {"config": path or null, "overrides": ["key=value", ...]}.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from fastnpo import distributed
from fastnpo.train import setup, train
from fastnpo.train.config import load_config


def main(path: str) -> None:
    runs = json.loads(Path(path).read_text())
    dist.init_process_group(backend="gloo")
    # train() joins the job and leaves it (setup / teardown); here the group outlives each run.
    distributed.teardown = lambda: None
    # optim.offload runs on CPU only in tests (see test_train.py's offload_on_cpu).
    setup.OFFLOAD_DEVICES = ("cuda", "cpu")
    try:
        for run in runs:
            train(load_config(run["config"], run["overrides"]))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
