"""Parallelism applied to built towers: tensor parallelism (megatron-core), its split plan and process groups,
activation checkpointing, and ZeRO-3 parameter helpers."""
