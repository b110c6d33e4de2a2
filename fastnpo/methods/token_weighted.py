"""Token-weighted gradient ascent: wga and satimp. Each forget term is the token-mean over the
forget answer tokens of -w NLL = w log p with a detached weight w per token, + retain_coeff x
retain NLL. The token log-probs come from the fused op once per micro-batch (token_level); the
weights are elementwise in them, so the one-pass design computes the loss too (token_separable).

- wga (WGA, Wang et al. 2025, arXiv 2502.19301): w = p^wga_beta; wga_beta 1 (the paper and
  open-unlearning).
- satimp (SatImp, Yang et al. 2025, arXiv 2505.11953): w = p^satimp_beta1 (1 - p)^satimp_beta2;
  5 and 1 (open-unlearning's defaults).
"""

from typing import ClassVar

import torch

from ..config import require
from ..ops.checks import check_positive
from .base import Method


class WGA(Method):
    name, label = "wga", "WGA"
    sets = ("forget", "retain")
    retain_nll = True
    token_level = True
    token_separable = True
    parameters: ClassVar[dict] = {"wga_beta": 1.0}

    def check(self, config) -> None:
        require(config.wga_beta > 0, "method.wga_beta", "must be > 0", config.wga_beta)

    def token_values(self, config, token_logps, hidden, weight, targets, scored, reference=None):
        return wga_token_weights(token_logps, beta=config.wga_beta) * token_logps


class SatImp(Method):
    name, label = "satimp", "SatImp"
    sets = ("forget", "retain")
    retain_nll = True
    token_level = True
    token_separable = True
    parameters: ClassVar[dict] = {"satimp_beta1": 5.0, "satimp_beta2": 1.0}

    def check(self, config) -> None:
        for key in ("satimp_beta1", "satimp_beta2"):
            require(getattr(config, key) > 0, f"method.{key}", "must be > 0", getattr(config, key))

    def token_values(self, config, token_logps, hidden, weight, targets, scored, reference=None):
        weights = satimp_token_weights(token_logps, beta1=config.satimp_beta1, beta2=config.satimp_beta2)
        return weights * token_logps


# ----------------------------------------------------------------------------- the loss


def wga_token_weights(token_logps: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """WGA's token weights p^beta = exp(beta * log p), detached (stop-gradient)."""
    beta = check_positive("beta", beta)
    return torch.exp(beta * token_logps.detach().float())


def satimp_token_weights(token_logps: torch.Tensor, *, beta1: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """SatImp's token weights p^beta1 * (1 - p)^beta2, detached (stop-gradient)."""
    beta1 = check_positive("beta1", beta1)
    beta2 = check_positive("beta2", beta2)
    p = torch.exp(token_logps.detach().float())
    return p.pow(beta1) * (1.0 - p).clamp(min=0.0).pow(beta2)
