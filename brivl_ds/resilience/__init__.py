"""Surviving faults of long runs: atomic checkpoints, non-finite steps, hung ranks, fault drills, resharding."""
