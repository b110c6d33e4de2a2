"""Experimental designs of the log-prob op: tested against float64 on CPU (the Triton kernels through
the interpreter), never measured on a GPU, not chosen by any default (ops/DESIGNS.md has the status
table and what each needs before it can become production).

    split.py     impl="split": the Triton forward, then per vocabulary block a Triton kernel writes
                 the block's dlogits and two library matmuls make dW (written once) and dH; no atomics
    epilogue.py  design="epilogue": one sweep of chunks of whole sequences through Triton GEMMs whose
                 epilogue keeps per-tile softmax statistics (separable losses only)

Their kernels stay in kernels/ (softmax_gradient.py, epilogue_forward.py, epilogue_backward.py), the
layer that holds every Triton kernel.
"""
