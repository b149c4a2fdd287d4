"""Entry point: `deepspeed [--hostfile hostfiles/a100] brivl_ds/train.py --preset tiny [--set key=value ...]`."""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Run as a script (how the deepspeed launcher starts it): put the repository root, not brivl_ds/, on the path.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from brivl_ds.config import PRESETS, build_config  # noqa: E402

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train BriVL with cross-modal MoCo on DeepSpeed ZeRO-3.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = build_config(args.preset, args.overrides)
    if args.print_config:
        print(cfg.to_json())
        return {}
    import torch.distributed as dist

    from brivl_ds.training.trainer import Trainer

    result = Trainer(cfg).fit()
    if dist.is_initialized():  # an orderly teardown (NCCL aborts its communicators here, on every rank)
        dist.destroy_process_group()
    return result


def exit_without_finalization(code: int = 0) -> None:
    """End a finished run without interpreter finalization. DeepSpeed's ZeRO-3 hooks hold its engine, and with it
    the process groups, in reference cycles through C++ autograd nodes that no gc can free; the groups' gloo threads
    then race finalization, and now and then a rank aborted (SIGABRT, 'terminate called without an active
    exception', seen in CI) after a successful run. Everything is written and closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
    exit_without_finalization(0)
