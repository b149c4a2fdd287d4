"""Parallelism applied to built towers: tensor parallelism (megatron-core) and its process groups."""
