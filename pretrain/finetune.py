"""Fine-tuning entry point: a pre-trained backbone (or none) plus a task head, under the same trainer.

    deepspeed --module pretrain.finetune --task classify --config configs/finetune_cls_tiny.yaml \\
        --init out/mtm/checkpoints --data out/imagenette_km2/train --out out/ft [section.key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --module pretrain.finetune --task classify ...

    deepspeed --module pretrain.finetune --task segment --config configs/finetune_seg_tiny.yaml \\
        --init out/mtm/checkpoints --data out/ade20k_tok/training --out out/seg

``--init`` takes a ``backbone.pt`` or a trainer checkpoints directory of any pre-training objective
(MTM, M3I, ADDP); omit it to train from scratch. ``--linear-probe`` freezes the backbone (classify
only). Everything else (schedule, layer-wise lr decay ``optim.layer_decay``, Token-CutMix in
``augment``, ZeRO, precision, checkpoints, ``--resume``) is ``pretrain.train``'s; evaluate with
``python -m pretrain.evaluate``. Tasks: ``classify`` (``pretrain.objectives.classify``) and
``segment`` (ADE20K label maps, ``pretrain.objectives.segment``; its ``augment`` section may not
hold geometric ops, which would move tokens but not label maps: the objective crops and flips both).
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain import train

__all__ = ["main"]

TASKS = {"classify": "classify", "segment": "segment"}


def parse_args(argv: list[str] | None = None):
    """pretrain.train's arguments for a fine-tuning run (``--task`` etc. become objective overrides).
    ``--help`` works without ``--task``."""
    p = argparse.ArgumentParser(prog="deepspeed --module pretrain.finetune", description=__doc__.split("\n\n")[0],
                                add_help=False)
    p.add_argument("--task", choices=sorted(TASKS), help="the downstream task (required)")
    p.add_argument("--init", default="", help="pre-trained backbone.pt or checkpoints directory ('' = scratch)")
    p.add_argument("--linear-probe", action="store_true", help="train only the head")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        print("\nThe remaining arguments are pretrain.train's:\n")
        train.parse_args(["--help"])
    if args.task is None:
        p.error(f"--task is required ({' or '.join(sorted(TASKS))})")
    extra = [f"objective.name={TASKS[args.task]}", f"objective.init={json.dumps(args.init)}"]
    if args.linear_probe:
        if args.task != "classify":
            p.error("--linear-probe is for --task classify")
        extra.append("objective.linear_probe=true")
    targs = train.parse_args(rest)
    targs.overrides = list(targs.overrides) + extra
    return targs


def main(argv: list[str] | None = None) -> int:
    return train.launched_main(lambda a: train.run(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
