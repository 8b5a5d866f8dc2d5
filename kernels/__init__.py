"""sloth_kernels: Triton kernels for 4-bit LoRA training, each with a PyTorch reference, and a model patcher."""
