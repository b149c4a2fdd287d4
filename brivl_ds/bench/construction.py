"""Peak memory per rank while building a preset's towers (online + momentum), partitioned as train.py builds them
(deepspeed.zero.Init over the data-parallel ranks) or plain (every rank builds everything, `--plain`):

    deepspeed --num_gpus 2 brivl_ds/bench/construction.py --preset base [--plain] [--set KEY=VALUE ...]

Prints, per rank, the resident memory before and after construction (peak, from getrusage), the parameter bytes
the rank holds, and the build time. A benchmark: it prints what it measured, on this machine; nothing asserts.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script (how the deepspeed launcher starts it): put the repository root, not brivl_ds/bench/, on the
    # path (that folder's data.py, kernels.py and serving.py would shadow top-level modules of those names).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--plain", action="store_true", help="build whole on every rank (no zero.Init)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)

    from brivl_ds.distributed import gather_objects
    from brivl_ds.config import CHINESE_ROBERTA_VOCAB, build_config
    from brivl_ds.distributed import init_distributed
    from brivl_ds.ds_config import load_ds_config
    from brivl_ds.construction.towers import build_brivl_moco
    from brivl_ds.construction.zero_init import partitioned_construction
    from brivl_ds.parallel.zero import is_partitioned

    cfg = build_config(args.preset, args.overrides)
    info = init_distributed(cfg.train.threads)
    ds_config = load_ds_config(cfg)
    before = peak_rss_gib()
    start = time.perf_counter()
    construct = None if args.plain else functools.partial(partitioned_construction, ds_config)
    torch.manual_seed(cfg.train.seed)
    model = (build_brivl_moco(cfg.model, cfg.moco, CHINESE_ROBERTA_VOCAB) if construct is None else
             build_brivl_moco(cfg.model, cfg.moco, CHINESE_ROBERTA_VOCAB, construct))
    seconds = time.perf_counter() - start
    held = sum((p.ds_tensor if is_partitioned(p) else p).numel() * p.element_size() for p in model.parameters())
    total = sum((p.ds_numel if is_partitioned(p) else p.numel()) for p in model.parameters())
    rows = gather_objects((info.rank, before, peak_rss_gib(), held / 2 ** 30, seconds))
    if info.rank == 0:
        mode = "plain (whole model on every rank)" if args.plain else "partitioned (zero.Init)"
        print(f"{args.preset}: {total / 1e6:,.1f} M parameters (online + momentum), {mode}, "
              f"{len(rows)} ranks on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        for rank, rss0, rss1, gib, secs in rows:
            print(f"  rank {rank}: peak RSS {rss0:.2f} GiB before, {rss1:.2f} GiB after construction; "
                  f"parameters held {gib:.2f} GiB; built in {secs:.0f} s")


if __name__ == "__main__":
    main()
