"""U2A (Unlearning to Align, arXiv 2504.06659): which negatives to unlearn, and how much, by
bi-level optimisation.

problem.py (J and the candidates' losses on a causal LM), scores.py (s_i = <grad J, grad l_i>
for all candidates at once), weights.py (mirror descent, top-k), training.py (the AdamW loop),
bilevel.py (the outer loop), preference.py (the split and the synthetic task), run.py (config,
task, `fastnpo u2a`).
"""

from ..modeling import DTYPES
from .bilevel import SELECTIONS, BilevelConfig, InnerConfig, check_bilevel, inner_unlearn, run_bilevel
from .problem import UNLEARN_LOSSES, ObjectiveConfig, PreferenceUnlearningProblem
from .run import (
    PreparedTask,
    U2AConfig,
    U2ADataConfig,
    U2AModelConfig,
    U2ARunConfig,
    load_u2a_config,
    prepare_task,
    run_prepared,
    run_u2a,
    save_plot,
    weight_histogram,
)
from .scores import (
    FD_LADDER,
    SCORE_METHODS,
    ScoreResult,
    calibrate_fd_step,
    compute_scores,
    outer_gradient,
    scores_central,
    scores_jvp,
    scores_per_example,
)
from .training import adamw_epochs, supervised_finetune
from .weights import mirror_descent_step, select_top_k, uniform_log_weights

__all__ = [
    "DTYPES",
    "FD_LADDER",
    "SCORE_METHODS",
    "SELECTIONS",
    "UNLEARN_LOSSES",
    "BilevelConfig",
    "InnerConfig",
    "ObjectiveConfig",
    "PreferenceUnlearningProblem",
    "PreparedTask",
    "ScoreResult",
    "U2AConfig",
    "U2ADataConfig",
    "U2AModelConfig",
    "U2ARunConfig",
    "adamw_epochs",
    "calibrate_fd_step",
    "check_bilevel",
    "compute_scores",
    "inner_unlearn",
    "load_u2a_config",
    "mirror_descent_step",
    "outer_gradient",
    "prepare_task",
    "run_bilevel",
    "run_prepared",
    "run_u2a",
    "save_plot",
    "scores_central",
    "scores_jvp",
    "scores_per_example",
    "select_top_k",
    "supervised_finetune",
    "uniform_log_weights",
    "weight_histogram",
]
