"""Benchmarks: they print what they measured on this machine, and nothing asserts.
construction.py (peak memory while building a preset, partitioned or plain), data.py (decode + augment + collate
against torchvision), serving.py (an exported model and its HTTP service, micro-batching on and off), kernels.py
(the fused Triton kernels against eager and torch.compile; GPU only)."""
