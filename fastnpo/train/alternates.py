"""`fastnpo make-alternates`: AltPO's alternate answers from the model's own greedy generation.

The data layer holds no model (data.make_alternates takes a generator); this module binds the
run's model and tokenizer (model.*, data.template) to modeling.greedy_generate and writes the
JSON lines that `data.alternate` reads (question, answer, alternate)."""

from pathlib import Path

import torch

from .. import distributed
from ..data import make_alternates
from ..modeling import greedy_generate
from .config import Config, ConfigError
from .setup import check_model_sources, load_model, load_tokenizer, resolve_model_dtype


def write_alternates(config: Config, out: str | Path, *, max_new_tokens: int = 64, overwrite: bool = False) -> dict:
    """Generate one alternate answer per forget question (data.forget / data.forget_split) with the
    model of model.name_or_path, greedily, and write them to `out`; refuses an existing file unless
    overwrite. Returns {"out", "rows"}."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists: pass --overwrite to replace it")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    check_model_sources(config)
    config = resolve_model_dtype(config, print)
    info = distributed.setup(config.run.device, timeout_s=config.distributed.timeout_s)
    try:
        tokenizer = load_tokenizer(config)
        model = load_model(config, info.device).eval()

        def generate(prompts: list[list[int]]) -> list[str]:
            with torch.no_grad():
                return greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)

        path = make_alternates(config.data, tokenizer, generate, out)
    finally:
        distributed.teardown()
    rows = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"wrote {rows} alternate answers to {path}; train AltPO with data.alternate={path}")
    return {"out": str(path), "rows": rows}
