"""INT4 W4A16 group-32 experts: K2's compressed-tensors `pack-quantized` layout, the torch reference and the
Triton kernels, behind one interface (`k2serve.worker.quant.moe`)."""
