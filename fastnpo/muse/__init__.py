"""MUSE (muse-bench/MUSE-News, MUSE-Books) as open-unlearning evaluates it, and Mini-MUSE.

    data.py       the hub layout (or a local folder laid out the same way): load_muse, raw_texts, trainer_rows
    minimuse.py   Mini-MUSE: a seeded synthetic news corpus in that layout, plus the trainer's rows
    metrics.py    stop-word truncation and ROUGE-L F1
    evaluate.py   evaluate_muse: KnowMem / VerbMem ROUGE, privleak, extraction strength
    demo.py       `python -m fastnpo.muse.demo`: fine-tune -> unlearn -> evaluate on Mini-MUSE

docs/muse.md: what each number means and the conventions.
"""

import importlib

# Where each public name lives; imported on first use, so that `fastnpo.muse.minimuse` (standard
# library only) does not pull in torch and transformers through this package.
_HOME = {
    "MuseData": "data",
    "load_muse": "data",
    "raw_texts": "data",
    "trainer_rows": "data",
    "write_trainer_rows": "data",
    "MuseEvalConfig": "evaluate",
    "evaluate_muse": "evaluate",
    "evaluate_muse_path": "evaluate",
    "summary": "evaluate",
    "generate_minimuse": "minimuse",
    "write_minimuse": "minimuse",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
