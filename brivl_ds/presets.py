"""Print a preset's resolved config and its parameter counts: `python -m brivl_ds.presets paper-1b`.

The model is built on the meta device (no memory is allocated), so even the largest preset is counted on a laptop.
"""
from __future__ import annotations

import argparse

import torch

from brivl_ds.config import CHINESE_ROBERTA_VOCAB, PRESETS, build_config
from brivl_ds.models.brivl import BriVL, count_parameters
from brivl_ds.moco.model import BriVLMoCo


def parameter_report(preset: str, overrides: list[str] | None = None, vocab_size: int = CHINESE_ROBERTA_VOCAB
                     ) -> dict[str, int]:
    cfg = build_config(preset, overrides)
    with torch.device("meta"):
        model = BriVLMoCo(BriVL(cfg.model, vocab_size=vocab_size), cfg.moco)
    image_total, image_train = count_parameters(model.online.image)
    text_total, text_train = count_parameters(model.online.text)
    online_total, online_train = count_parameters(model.online)
    momentum_total, _ = count_parameters(model.momentum)
    return {"image_tower": image_total, "image_tower_trainable": image_train, "text_tower": text_total,
            "text_tower_trainable": text_train, "online": online_total, "online_trainable": online_train,
            "momentum": momentum_total, "total": online_total + momentum_total + model.log_tau.numel()}


def tensor_parallel_report(preset: str, overrides: list[str] | None = None, vocab_size: int = CHINESE_ROBERTA_VOCAB,
                           sizes: tuple[int, ...] = (1, 2, 4, 8)) -> dict[int, dict[str, int] | str]:
    """Parameters one TP rank holds of each online tower (the momentum copy holds the same again) at each TP size,
    exactly from the split plan; ZeRO-3 then divides each by the data-parallel size. A size the heads do not
    divide maps to the reason."""
    from brivl_ds.parallel.tp_plan import parameters_per_tp_rank

    cfg = build_config(preset, overrides)
    with torch.device("meta"):
        model = BriVL(cfg.model, vocab_size=vocab_size)
    report: dict[int, dict[str, int] | str] = {}
    for tp in sizes:
        try:
            report[tp] = parameters_per_tp_rank(model, tp, cfg.parallel.vocab_parallel)
        except ValueError as err:
            report[tp] = str(err)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    print(build_config(args.preset, args.overrides).to_json())
    report = parameter_report(args.preset, args.overrides)
    width = max(map(len, report))
    print(f"\nparameters of preset {args.preset!r} (vocabulary {CHINESE_ROBERTA_VOCAB}):")
    for key, value in report.items():
        print(f"  {key:<{width}} {value:>15,d}  ({value / 1e6:,.1f} M)")
    print("\nparameters per tensor-parallel rank, one online tower (momentum: the same again; bf16: 2 bytes each; "
          "ZeRO-3 divides by the data-parallel size):")
    for tp, counts in tensor_parallel_report(args.preset, args.overrides).items():
        if isinstance(counts, str):
            print(f"  TP={tp}: not possible: {counts}")
        else:
            print(f"  TP={tp}: image {counts['image'] / 1e6:,.1f} M, text {counts['text'] / 1e6:,.1f} M")


if __name__ == "__main__":
    main()
