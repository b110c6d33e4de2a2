"""The unlearning trainer: config, setup, the loop, checkpoints, sharding.

    config.py      the run config tree, loaded from YAML + overrides and checked
    loop.py        train(): the run top to bottom; build_reference_cache (`fastnpo cache-ref`)
    sharding.py    FSDP2 (one unit per decoder layer + the root)
    checkpoint.py  DCP checkpoints, bit-exact resume, the full state dict for export
"""

from .config import Config, ConfigError, load_config
from .loop import build_reference_cache, train

__all__ = ["Config", "ConfigError", "build_reference_cache", "load_config", "train"]
