"""Triton kernels of the model's layers other than the INT4 experts (those live in `k2serve.worker.quant`)."""
