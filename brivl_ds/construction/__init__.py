"""Building the towers: plain, or partitioned under deepspeed.zero.Init (init replay, pretrained loading)."""
