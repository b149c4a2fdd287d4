"""brivl_kernels: fused Triton kernels for BriVL training."""
