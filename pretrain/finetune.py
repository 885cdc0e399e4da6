"""Fine-tuning entry point: a pre-trained backbone (or none) plus a task head, under the same trainer.

    deepspeed --module pretrain.finetune --task classify --config configs/finetune_cls_tiny.yaml \\
        --init out/mtm/checkpoints --data out/imagenette_km2/train --out out/ft [section.key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --module pretrain.finetune --task classify ...

    deepspeed --module pretrain.finetune --task segment --config configs/finetune_seg_tiny.yaml \\
        --init out/mtm/checkpoints --data out/ade20k_tok/training --out out/seg

``--init`` takes a ``backbone.pt`` or a trainer checkpoints directory of any pre-training objective
(MTM, M3I, ADDP); omit it to train from scratch. A pixel-stem backbone (ADDP's) is fine-tuned on
the stored ids decoded to pixels by the data's tokenizer: ``--init`` sets ``objective.decoder``
(``data.tokenizer``, else ``tokenizer.pt`` in the dataset root) and ``objective.pixel_patch`` (the
backbone's) unless given. ``--linear-probe`` freezes the backbone (classify only). Everything else
(schedule, layer-wise lr decay ``optim.layer_decay``, Token-CutMix in ``augment``, ZeRO, precision,
checkpoints, ``--resume``) is ``pretrain.train``'s; evaluate with ``python -m pretrain.evaluate``.
Tasks: ``classify`` (``pretrain.objectives.classify``) and ``segment`` (ADE20K label maps,
``pretrain.objectives.segment``; its ``augment`` section may not hold geometric ops, which would move
tokens but not label maps: the objective crops and flips both).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from pretrain import train
from pretrain.objectives.parts import backbone_config
from storage import io as sio

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
    targs.overrides += pixel_backbone_overrides(args.init, targs)
    return targs


def pixel_backbone_overrides(init: str, targs: argparse.Namespace) -> list[str]:
    """For an ``--init`` pixel-stem backbone (ADDP's): ``objective.decoder`` = the data's tokenizer
    (``data.tokenizer``, else ``tokenizer.pt`` in the dataset root of ``data.train``) and
    ``objective.pixel_patch`` = the backbone's patch, each unless the command line sets it; [] otherwise."""
    backbone = backbone_config(init) if init and Path(init).exists() else {}
    if backbone.get("stem") != "pixel":
        return []
    given = {o.split("=", 1)[0] for o in targs.overrides}
    cfg = train.config_from_args(copy.copy(targs))
    extra = []
    if "objective.decoder" not in given and cfg.data.train:
        split_dir = train.resolve_manifest(cfg.data.train).rsplit("/", 1)[0]
        url = cfg.data.tokenizer or sio.join(sio.dirname(split_dir), "tokenizer.pt")
        extra.append(f"objective.decoder={json.dumps(url)}")
    if "objective.pixel_patch" not in given:
        extra.append(f"objective.pixel_patch={backbone['patch_size']}")
    if extra and os.environ.get("RANK", "0") == "0":
        print(f"--init {init} is a pixel-stem backbone: fine-tuning on the ids decoded to pixels "
              f"({' '.join(extra)})", flush=True)
    return extra


def main(argv: list[str] | None = None) -> int:
    return train.launched_main(lambda a: train.run(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
