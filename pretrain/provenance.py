"""Which tokens a model was trained on, recorded in its checkpoints and checked wherever it meets data.

Token ids only mean something under the tokenizer that produced them: a backbone trained on the
tokens of tokenizer A, fine-tuned or evaluated on tokens of tokenizer B, trains or scores without
complaint and is silently wrong. So every checkpoint records the data's *token identity*::

    {"tokenizer_fingerprint": "15ed1c...", "grid": [16, 16], "vocab_size": 256}

in ``<tag>/tokens.json`` beside DeepSpeed's files (small, read without loading any weights), in
the DeepSpeed client state (key ``tokens``) and in ``backbone.pt`` (key ``tokens``). Evaluation,
``finetune --init``, ``--resume``, export and generation compare it with the data (or carry it
forward) and refuse a mismatch with ``TokenizerMismatch``, naming both fingerprints, unless
explicitly allowed (``--allow-tokenizer-mismatch`` / ``data.allow_tokenizer_mismatch``).
Checkpoints written before this existed, and pixel-input runs, have no identity: nothing to check.

``latest`` files are read through ``pretrain.checkpoint_io.checkpoint_tag_dir`` (re-exported here): the tag
must name a directory inside the checkpoints directory, so a planted ``latest`` cannot send a reader
elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.checkpoint_io import checkpoint_tag_dir, safe_load

__all__ = ["TokenizerMismatch", "identity_of_meta", "checkpoint_tag_dir", "identity_of_checkpoint",
           "write_identity", "check_identity", "TOKENS_FILE"]

TOKENS_FILE = "tokens.json"


class TokenizerMismatch(ValueError):
    """A checkpoint meets tokens of another tokenizer (or grid, or codebook size) than it was trained on."""


def identity_of_meta(meta) -> dict:
    """The token identity of a dataset split (``storage.manifest.DatasetMeta``)."""
    return {"tokenizer_fingerprint": meta.tokenizer_fingerprint, "grid": [int(g) for g in meta.grid],
            "vocab_size": int(meta.vocab_size)}


def write_identity(tag_dir: Path, identity: dict | None) -> None:
    """Write ``tokens.json`` into a checkpoint's tag directory (nothing for pixel runs)."""
    if identity is not None:
        (tag_dir / TOKENS_FILE).write_text(json.dumps(identity, sort_keys=True) + "\n")


def identity_of_checkpoint(ckpt: str | os.PathLike) -> dict | None:
    """The token identity recorded in a trainer checkpoint (directory) or a ``backbone.pt`` file; None if none."""
    path = Path(ckpt)
    if path.is_file():
        state = safe_load(path)
        return state.get("tokens") if isinstance(state, dict) else None
    file = checkpoint_tag_dir(path) / TOKENS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def check_identity(trained: dict | None, data: dict | None, ckpt_where: str, data_where: str,
                   allowed: bool = False, flag: str = "--allow-tokenizer-mismatch") -> None:
    """Raise TokenizerMismatch when both identities are known and differ (unless ``allowed``)."""
    if trained is None or data is None or allowed:
        return
    diff = [k for k in ("tokenizer_fingerprint", "grid", "vocab_size") if trained.get(k) != data.get(k)]
    if not diff:
        return
    fp_a, fp_b = str(trained.get("tokenizer_fingerprint"))[:12], str(data.get("tokenizer_fingerprint"))[:12]
    raise TokenizerMismatch(
        f"{ckpt_where} was trained on tokens of tokenizer {fp_a} (grid {trained.get('grid')}, K "
        f"{trained.get('vocab_size')}) but {data_where} holds tokens of tokenizer {fp_b} (grid {data.get('grid')}, "
        f"K {data.get('vocab_size')}); use data made by the same tokenizer, or pass {flag} if this is deliberate")
