"""The tokenizer interface shared by every image tokenizer, plus checkpoint I/O and metrics.

A tokenizer maps RGB images to a grid of discrete ids and back:

    images uint8 (N, R, R, 3)  --encode-->  ids int64 (N, h, w) in [0, K)
    ids int64 (N, h, w)        --decode-->  images uint8 (N, R, R, 3)

where ``R = resolution`` and ``(h, w) = grid``. ``codebook`` is a float32 (K, D) tensor and
``embed(ids)`` looks ids up in it, so a model can consume tokens without re-running the encoder.

Checkpoints are a plain dict of JSON-safe values and tensors::

    torch.save({"kind": str, "config": {...}, "state_dict": {name: Tensor}}, path)

and are read back only with ``torch.load(path, map_location="cpu", weights_only=True)``, so loading
never unpickles arbitrary objects. ``load_tokenizer`` dispatches on ``"kind"`` through a small
registry filled by the ``@register_tokenizer("kind")`` class decorator; a kind of another package is
imported through its entry point in the ``vqpt.tokenizers`` group. ``fingerprint`` is hashed once per
instance and again only when the weights change.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from storage.plugins import load_plugin

__all__ = [
    "CHECKPOINT_KEYS",
    "Tokenizer",
    "codebook_perplexity",
    "fingerprint_of",
    "load_tokenizer",
    "psnr",
    "TokenizerFingerprintMismatch",
    "register_tokenizer",
]

CHECKPOINT_KEYS = ("kind", "config", "state_dict")

# kind -> class; filled by @register_tokenizer. Built-in kinds are imported lazily on first load, other
# packages' kinds through their entry point in the ``vqpt.tokenizers`` group (docs/extending.md).
ENTRY_POINT_GROUP = "vqpt.tokenizers"
_REGISTRY: dict[str, type[Tokenizer]] = {}
_BUILTIN_MODULES: dict[str, str] = {
    "kmeans": "pipeline.tokenizer.kmeans",
    "codebook": "pipeline.tokenizer.codebook_only",
    "vitvqgan": "pipeline.tokenizer.vitvqgan",
}

T = TypeVar("T", bound="type[Tokenizer]")


def register_tokenizer(kind: str) -> Callable[[T], T]:
    """Class decorator: register a Tokenizer subclass under ``kind`` and set ``cls.kind``."""

    def deco(cls: T) -> T:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"tokenizer kind {kind!r} already registered by {_REGISTRY[kind].__name__}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def _canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; NaN/inf are rejected (they are not JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of ``t`` in C order (works for every dtype, bfloat16 included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def fingerprint_of(kind: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest of (kind, config, weights), independent of process, device and dict order.

    Hashed, in order: the canonical JSON of ``{"kind", "config"}``; then for every tensor name in
    sorted order: the name, its dtype, its shape and its raw C-order bytes (each field
    length-prefixed so that no two different inputs share a byte stream).
    """
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(_canonical_json({"kind": kind, "config": dict(config)}).encode())
    for name in sorted(state_dict):
        t = state_dict[name]
        put(name.encode())
        put(str(t.dtype).encode())
        put(_canonical_json(list(t.shape)).encode())
        put(_tensor_bytes(t))
    return h.hexdigest()


class Tokenizer(ABC):
    """Interface every tokenizer implements.

    Subclasses implement the abstract members and ``config_dict``/``state_dict``/``from_state``;
    ``fingerprint``, ``save``, ``vocab_size`` and ``embed`` come for free from those.
    """

    kind: str = ""  # set by @register_tokenizer

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def resolution(self) -> int:
        """Side in pixels of the square RGB images ``encode`` accepts and ``decode`` returns."""

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(h, w): the token grid one image becomes."""

    @property
    @abstractmethod
    def codebook(self) -> torch.Tensor:
        """float32 (K, D) CPU tensor: row k is the embedding of id k."""

    @property
    def vocab_size(self) -> int:
        """K: ids lie in [0, K)."""
        return int(self.codebook.shape[0])

    # ---- coding ---------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, R, R, 3) RGB images -> int64 (N, h, w) ids in [0, K). Deterministic."""

    @abstractmethod
    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Integer (N, h, w) ids in [0, K) -> uint8 (N, R, R, 3) RGB reconstructions."""

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """``images`` as an array if it is uint8 (N, R, R, 3) at this tokenizer's resolution, else ValueError."""
        images, r = np.asarray(images), self.resolution
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"expected uint8 (N, {r}, {r}, 3) images, got {images.dtype} {images.shape}")
        return images

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as an array if it is integer (N, h, w) on this tokenizer's grid with values in [0, K), else
        ValueError."""
        ids, (gh, gw) = np.asarray(ids), self.grid
        if ids.ndim != 3 or tuple(ids.shape[1:]) != (gh, gw) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expected integer ids of shape (N, {gh}, {gw}), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids out of range [0, {self.vocab_size})")
        return ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """LongTensor (...) ids -> FloatTensor (..., D) codebook rows (on the ids' device)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        cb = self.codebook.to(ids.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cb.shape[0]):
            raise ValueError(f"ids out of range [0, {cb.shape[0]})")
        return torch.nn.functional.embedding(ids, cb)

    # ---- persistence ----------------------------------------------------------------------------
    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """JSON-safe dict that, with ``state_dict()``, fully determines the tokenizer."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> CPU tensor: all weights."""

    @classmethod
    @abstractmethod
    def from_state(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Tokenizer:
        """Inverse of (``config_dict()``, ``state_dict()``)."""

    def live_weights(self) -> dict[str, torch.Tensor]:
        """The tensors ``state_dict()`` is made of, as the tokenizer holds them (any device, no copies): what the
        fingerprint cache watches. Override where ``state_dict`` copies (e.g. to the CPU)."""
        return self.state_dict()

    @property
    def fingerprint(self) -> str:
        """sha256 hex of kind + config JSON + weights (see ``fingerprint_of``); stable across save/load.

        Hashed once per instance and kept while the config and weights stay as they are. The cache is keyed by
        the config's JSON and, per tensor of ``live_weights``, its storage, offset, shape, dtype and version
        counter, which torch bumps on every in-place change (an optimizer step, ``copy_``,
        ``load_state_dict``); a replaced tensor has another storage (the cache holds the old ones, so no
        address is reused while it lives). So weights trained after construction give a new fingerprint at
        the next access. Inference-mode tensors keep no version counter: those are hashed at every access."""
        key = self._fingerprint_key()
        cached = self.__dict__.get("_fingerprint_cache")
        if key is not None and cached is not None and cached[0] == key[0]:
            return cached[1]
        value = fingerprint_of(self.kind, self.config_dict(), self.state_dict())
        if key is not None:
            self.__dict__["_fingerprint_cache"] = (key[0], value, key[1])
        return value

    def _fingerprint_key(self) -> tuple[tuple, list[torch.Tensor]] | None:
        """(what the fingerprint depends on, the tensors to keep alive), or None when it cannot be watched."""
        weights = self.live_weights()
        if any(t.is_inference() for t in weights.values()):
            return None
        parts = tuple((name, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                       str(t.dtype), str(t.device), t._version) for name, t in sorted(weights.items()))
        return (self.kind, _canonical_json(self.config_dict()), parts), list(weights.values())

    def __getstate__(self) -> dict:
        """Copies (pickle, Ray) leave the fingerprint cache behind: it holds tensor references."""
        state = dict(self.__dict__)
        state.pop("_fingerprint_cache", None)
        return state

    def _checkpoint(self) -> dict[str, Any]:
        if not self.kind:
            raise TypeError(f"{type(self).__name__} is not registered (use @register_tokenizer)")
        config = self.config_dict()
        _canonical_json(config)  # fail early on non-JSON-safe configs
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        return {"kind": self.kind, "config": config, "state_dict": state}

    def save(self, path: str | Path) -> None:
        """Write ``{"kind", "config", "state_dict"}`` via ``torch.save`` (tensors + JSON-safe values only)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self._checkpoint(), tmp)
        tmp.replace(path)  # atomic on POSIX: readers never see a half-written checkpoint

    def to_bytes(self) -> bytes:
        """The checkpoint ``save`` writes, as bytes (for object stores and Ray actors)."""
        buf = io.BytesIO()
        torch.save(self._checkpoint(), buf)
        return buf.getvalue()


class TokenizerFingerprintMismatch(ValueError):
    """A tokenizer checkpoint is not the one that made the tokens in use (fingerprints differ)."""


def load_tokenizer(path: str | Path | bytes, fingerprint: str | None = None) -> Tokenizer:
    """Load any registered tokenizer: the one loader for every path that takes a tokenizer.

    ``path``: a local path, any ``storage.io`` URL (``file://``, ``s3://``, ``http(s)://``; read with its
    retries and deadline) or checkpoint bytes. Read with ``torch.load(weights_only=True)``: no pickles.
    ``fingerprint``: the tokenizer fingerprint of the data in use (the manifest's); a tokenizer with
    another fingerprint raises ``TokenizerFingerprintMismatch`` naming both. None checks nothing.
    """
    if isinstance(path, bytes):
        source, where = io.BytesIO(path), "<checkpoint bytes>"
    else:
        from storage import io as sio

        where = str(path)
        source = io.BytesIO(sio.read_bytes(where))
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ValueError(f"{where}: not a tokenizer checkpoint (expected keys {CHECKPOINT_KEYS})")
    kind = ckpt["kind"]
    if kind not in _REGISTRY and kind in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[kind])
    if kind not in _REGISTRY and isinstance(kind, str):
        load_plugin(ENTRY_POINT_GROUP, kind, f"{where}: tokenizer kind")  # its module registers the class
    if kind not in _REGISTRY:
        raise ValueError(f"{where}: unknown tokenizer kind {kind!r} (known: {sorted(_REGISTRY)}; a tokenizer of "
                         f"another package needs that package installed, entry point group {ENTRY_POINT_GROUP!r})")
    tokenizer = _REGISTRY[kind].from_state(ckpt["config"], ckpt["state_dict"])
    if fingerprint is not None and tokenizer.fingerprint != fingerprint:
        raise TokenizerFingerprintMismatch(
            f"tokenizer {where} (fingerprint {tokenizer.fingerprint[:12]}) did not make the tokens in use "
            f"(their tokenizer fingerprint is {fingerprint[:12]}); pass the data's tokenizer (usually "
            "tokenizer.pt in the dataset root)")
    return tokenizer


# ---- metrics --------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 arrays of equal shape (peak 255).

    Computed from the MSE over *all* elements (so for a batch it is the PSNR of the pooled MSE, not
    the mean of per-image PSNRs). Returns ``inf`` for identical inputs.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise TypeError(f"psnr expects uint8 arrays, got {a.dtype} and {b.dtype}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def codebook_perplexity(ids: np.ndarray | torch.Tensor, vocab_size: int) -> float:
    """exp(entropy) of the empirical id histogram: 1 if one code is used, K if all are used equally."""
    ids_np = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
    if ids_np.size == 0:
        raise ValueError("no ids")
    if ids_np.min() < 0 or ids_np.max() >= vocab_size:
        raise ValueError(f"ids out of range [0, {vocab_size})")
    p = np.bincount(ids_np.astype(np.int64), minlength=vocab_size).astype(np.float64) / ids_np.size
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))
