"""Resuming a checkpoint at another world size: what must stay fixed, and the one-line refusal otherwise.

A global optimizer step is M micro-batches of B samples (M = world size x ``optim.grad_accum``), and
``storage.order.BatchLayout`` makes micro-batch J of the job the same samples at any world size. So a
run resumes exactly, at any world size W' that divides M, when B (``data.batch_size``) is kept and
``optim.grad_accum`` becomes M / W': every later step is the same set of micro-batches, each keyed
by its slot in the step for masks and dropout (``pretrain.train.step_seed``), gradients are
averaged over the same M micro-batches, and the learning rate (a function of the global batch) is
unchanged. ZeRO 1/2 optimizer state is written per rank in DeepSpeed's elastic layout
(``elastic_checkpoint``, set by ``pretrain.optim.deepspeed_config``) and merged and re-partitioned for
the new ranks on load (``load_zero_state``); ZeRO 0 keeps it whole. Anything else would change what a
step means, so it is refused, saying which settings would work.

The checkpoint side: ``stream_rank<R>.json`` (``checkpoint.save_training``) holds the stream's position
(the same on every rank: ``storage.stream.TokenStream.position_state``), the world size, and the
trainer's ``grad_accum`` and ZeRO stage; checkpoints written before elastic resume lack these and
resume at their own world size only.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ElasticResumeError", "saved_stream_state", "check_resume"]


class ElasticResumeError(ValueError):
    """The run's world size, batch size or accumulation cannot continue the checkpoint's steps exactly
    (every rank finds it alike, so only rank 0 reports it: ``pretrain.train.launched_main``)."""


def saved_stream_state(tag_dir: Path) -> dict:
    """The stream state rank 0 saved in checkpoint ``tag_dir`` (every rank saved the same position)."""
    path = tag_dir / "stream_rank0.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir} has no stream state ({path.name}); it was not written by "
                                "pretrain.train")
    state = json.loads(path.read_text()[: 1 << 20])
    if not isinstance(state, dict) or "epoch" not in state or "world_size" not in state:
        raise ValueError(f"{path}: not a stream state (expected a JSON object with 'epoch' and 'world_size')")
    return state


def _world_sizes(micro_batches: int, partitions: int | None) -> list[int]:
    return [w for w in range(1, micro_batches + 1) if micro_batches % w == 0 and (partitions or w) % w == 0]


def check_resume(state: dict, batch_size: int, grad_accum: int, world: int, where: Path,
                 partitions: int | None = None, zero_stage: int | None = None) -> None:
    """ElasticResumeError (one line) unless this run, ``world`` ranks x ``batch_size`` x ``grad_accum`` at ZeRO
    ``zero_stage``, continues the steps of the checkpoint whose stream state is ``state`` exactly
    (``partitions``: the stream's, which the world size must divide too)."""
    saved_world, saved_batch = int(state["world_size"]), state.get("batch_size")
    if zero_stage is not None and "zero_stage" in state and int(state["zero_stage"]) != zero_stage:
        raise ElasticResumeError(f"{where} was written at ZeRO stage {state['zero_stage']}: resume it with "
                                 f"engine.zero_stage={state['zero_stage']}")
    if "grad_accum" not in state:  # written before elastic resume: its world size only
        if world != saved_world:
            raise ElasticResumeError(f"{where} was written before elastic resume (no grad_accum in its stream "
                                     f"state): resume it at its world size, {saved_world} ranks")
        return
    steps = saved_world * int(state["grad_accum"])
    was = f"{where} was written at {saved_world} ranks x {saved_batch} samples x accum {state['grad_accum']}"
    sizes = _world_sizes(steps, partitions)
    if saved_batch is not None and batch_size != saved_batch:
        raise ElasticResumeError(f"{was}: keep data.batch_size={saved_batch} (a micro-batch's samples are "
                                 f"fixed) and set optim.grad_accum={steps} / ranks (ranks: {sizes})")
    if world * grad_accum == steps:
        return
    if world in sizes:
        raise ElasticResumeError(f"{was} ({steps} micro-batches per step): at {world} ranks set "
                                 f"optim.grad_accum={steps // world}")
    raise ElasticResumeError(f"{was} ({steps} micro-batches per step), which {world} ranks cannot split "
                             f"evenly: resume at a world size in {sizes} with optim.grad_accum={steps} / ranks")


def load_zero_state(engine, tag_dir: Path, saved_world: int) -> None:
    """Give a ZeRO 1/2 ``engine`` at a new world size the optimizer state of checkpoint ``tag_dir``,
    written by ``saved_world`` ranks, re-partitioned for this one: AdamW's moments and step, the fp32
    master weights (exact, also under bf16) and the param groups' learning rates. Call after
    ``engine.load_checkpoint(..., load_optimizer_states=False)`` (module, scheduler, counters).

    DeepSpeed 0.19.8's ``load_checkpoint`` refuses another data-parallel size outright, although its
    ZeRO 1/2 optimizer still has the code that merges elastic partitions (the path it takes at the
    same size): this hands it every rank's saved partition, read with ``checkpoint.safe_load``. The
    files must be elastic (``elastic_checkpoint``, which ``pretrain.optim.deepspeed_config`` sets);
    checkpoints written before that hold per-rank state and are refused.
    """
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        BASE_OPTIMIZER_STATE_STEP,
        PARAM_ALIGNMENT_PADDINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    from pretrain.checkpoint_io import safe_load

    files = [tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(saved_world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{tag_dir}: ZeRO optimizer partitions {missing} are missing (the checkpoint was "
                                f"written by {saved_world} ranks)")
    opt = engine.optimizer
    states = []
    for f in files:
        state = safe_load(f)
        state = state.get("optimizer_state_dict") if isinstance(state, dict) else None
        if not isinstance(state, dict) or SINGLE_PARTITION_OF_FP32_GROUPS not in state:
            raise ValueError(f"{f}: not a ZeRO 1/2 optimizer partition")
        if not isinstance(state.get(BASE_OPTIMIZER_STATE), list):
            raise ElasticResumeError(f"{tag_dir} holds per-rank ZeRO state (written before elastic checkpoints): "
                                     f"resume it at its world size, {saved_world} ranks")
        if state.get(PARAM_ALIGNMENT_PADDINGS, opt.round_robin_bit16_padding) != opt.round_robin_bit16_padding:
            raise ElasticResumeError(f"{tag_dir}: its ZeRO parameter alignment differs from this run's; resume it "
                                     f"at its world size, {saved_world} ranks")
        # torch's AdamW keeps its step per parameter (restored with the moments); DeepSpeed's merge also
        # wants a param-group step, which it only copies into the groups: give it one, then take it out
        state.setdefault(BASE_OPTIMIZER_STATE_STEP, 0)
        states.append(state)
    opt._restore_elastic_base_optimizer_state(states)
    for group in opt.optimizer.param_groups:
        group.pop("step", None)
    opt._restore_from_elastic_fp32_weights(states)
    opt._link_all_hp_params()
    # the groups' learning rates come with optimizer state, which load_checkpoint skipped: the scheduler's
    if engine.lr_scheduler is not None:
        for group, lr in zip(opt.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
