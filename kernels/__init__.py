"""Triton kernels for fused linear + log-softmax log-probabilities.

Only @triton.jit functions and their launchers live here: no autograd, no nn.Module,
nothing from fastnpo. Installed as ``fastnpo.kernels``.
"""
