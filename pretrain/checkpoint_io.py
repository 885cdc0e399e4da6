"""Finding and reading checkpoint files safely: the layer under ``pretrain.checkpoint`` and ``pretrain.provenance``.

``checkpoint_tag_dir`` resolves ``latest`` or a tag directory (the tag must be a plain name inside the
checkpoints directory: a planted ``latest`` cannot send a reader elsewhere). ``safe_load`` reads every file
with ``torch.load(weights_only=True)``; if a DeepSpeed file holds an object that this refuses, it is read
again under ``torch.serialization.safe_globals`` with exactly the globals it names, when they are all in a
small allowlist (numpy scalars/arrays, ``argparse.Namespace``, paths, DeepSpeed's fp16 loss scalers);
otherwise it is refused. Nothing is ever unpickled freely. ``weights_only_loads`` forces the same on library
code that calls ``torch.load`` itself (DeepSpeed's ZeRO consolidation). ``atomic_save`` writes a file readers never see
half-written.

Nothing here knows what a checkpoint holds: ``pretrain.checkpoint`` (backbones, the trainer's save and
restore) and ``pretrain.provenance`` (token identities) both build on this module, and neither on the other's
internals.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["checkpoint_tag_dir", "safe_load", "atomic_save", "torch_load", "weights_only_loads"]

# Globals a DeepSpeed file may name that are safe to rebuild (plain data); anything else is refused.
_SAFE_GLOBALS = frozenset({
    "numpy.dtype", "numpy.ndarray",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "argparse.Namespace", "pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath",
    # DeepSpeed's optimizer states hold its loss scaler, the ZeRO stage enum and fragment records (plain data)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})
_NUMPY_DTYPE_CLASS = re.compile(r"numpy\.dtypes\.\w+DType")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


# -- where a checkpoint is ---------------------------------------------------------------------


def checkpoint_tag_dir(ckpt: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag directory of a checkpoint: ``ckpt`` itself if it is one (``stepNNNNNNN``), else
    ``ckpt/<tag>`` with ``tag`` from the argument or ``ckpt/latest``. A tag that is not a plain name
    inside ``ckpt`` raises ValueError; a missing ``latest`` FileNotFoundError."""
    path = Path(ckpt)
    if tag is None:
        latest = path / "latest"
        if not latest.is_file():
            if path.is_dir() and any(path.glob("*model_states.pt")):  # a tag directory itself
                return path
            raise FileNotFoundError(f"{path}: no 'latest' file naming the checkpoint tag; pass a checkpoints "
                                    "directory written by the trainer, or one stepNNNNNNN directory in it")
        tag = latest.read_text(errors="replace")[:256].strip()
        where = f"{latest} names"
    else:
        where = "the"
    if not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise ValueError(f"{where} checkpoint tag {tag!r}, which is not a plain directory name inside {path}; "
                         "write the tag (e.g. step0000100) into it")
    tag_dir = path / tag
    if tag_dir.is_symlink() or not tag_dir.resolve().is_relative_to(path.resolve()):
        raise ValueError(f"{where} checkpoint tag {tag!r}, which leads outside {path}; refusing to follow it")
    return tag_dir


# -- reading and writing files ---------------------------------------------------------------------


def torch_load(path: Path, map_location=None) -> object:
    """``torch.load(weights_only=True)`` (default: on CPU); a file that is not a torch checkpoint -> ValueError."""
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({err or type(err).__name__})") from err


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_global(name: str) -> object:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def safe_load(path: str | os.PathLike, map_location=None) -> object:
    """``torch.load(weights_only=True)``, retried with exactly the allowlisted globals the file names.

    The trainer reads DeepSpeed checkpoints through this too (``use_safe_checkpoint_loading``)."""
    path = Path(path)
    try:
        return torch_load(path, map_location)
    except pickle.UnpicklingError as err:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError) as inner:
            raise ValueError(f"{path}: not a readable torch checkpoint ({inner})") from err
        refused = [n for n in names if n not in _SAFE_GLOBALS and not _NUMPY_DTYPE_CLASS.fullmatch(n)]
        if refused or not names:
            raise ValueError(f"{path}: holds objects that are not loaded for safety: {refused or err}; "
                             "keep only tensors and plain data in the DeepSpeed client_state") from err
        allowed = [(_resolve_global(n), n) for n in names]
        if "numpy.dtype" in names:  # a dtype is rebuilt as an instance of its numpy.dtypes.*DType class
            import numpy as np

            allowed += [c for n, c in vars(np.dtypes).items() if _NUMPY_DTYPE_CLASS.fullmatch(f"numpy.dtypes.{n}")]
        with torch.serialization.safe_globals(allowed):
            return torch_load(path, map_location)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """While the block runs, every ``torch.load`` of this process reads weights only, whatever its caller
    asked (``$TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with the allowlisted globals (``_SAFE_GLOBALS``) permitted:
    for library code that calls ``torch.load(..., weights_only=False)`` itself. Not thread-safe (it sets
    environment variables); for one-shot commands such as the export."""
    allowed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy.core's deprecated aliases
        for name in sorted(_SAFE_GLOBALS):
            with contextlib.suppress(ImportError, AttributeError):
                allowed.append((_resolve_global(name), name))
    import numpy as np

    allowed += [c for n, c in vars(np.dtypes).items() if _NUMPY_DTYPE_CLASS.fullmatch(f"numpy.dtypes.{n}")]
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {n: os.environ.get(n) for n in names}
    os.environ[names[0]] = "1"
    os.environ.pop(names[1], None)
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
