"""The token codec interface: ``CodecSpec`` (what a manifest stores), ``TokenCodec`` (the base class
every codec derives from, with its input validation and decode bounds), ``CodecError`` and the codec
registry.

The registry: ``@register_codec`` on a ``TokenCodec`` subclass makes its ``name`` usable in a
``CodecSpec``, ``make_codec`` and ``fit_codec``. The built-in codecs register themselves in
``storage.codec``; a codec from another package registers when its module is imported, and is found
without an import by its entry point in the ``vqpt.codecs`` group (``name = "package.module:Class"``), so
a manifest naming it opens in any process where that package is installed (``docs/extending.md``).
The built-in codecs, ``fit_codec`` and the rest are in ``storage.codec``, which re-exports everything
here; import from there.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from storage.errors import StorageError
from storage.plugins import entry_points, load_plugin

CODEC_NAMES: tuple[str, ...] = ("raw16", "bitpack", "seit", "zstd", "rans", "zstd2d")  # the built-in codecs
ENTRY_POINT_GROUP = "vqpt.codecs"
MAX_VOCAB = 65536
MAX_DECODE_TOKENS = 1 << 26  # most tokens one decode call returns (128 MiB as uint16): bounds every codec


class CodecError(StorageError):
    """Stored token or label-map bytes are corrupt, truncated or inconsistent with the codec."""


@dataclass(frozen=True)
class CodecSpec:
    """What the manifest stores to rebuild a codec: JSON-serialisable.

    name: one of ``CODEC_NAMES``. vocab_size: K, 2..65536. params: JSON-safe values only (str keys;
    int, float, str, bool, None, lists and dicts of those; binary blobs as base64 str). ``params`` is
    copied on construction; treat it as read-only.
    """

    name: str
    vocab_size: int
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES and self.name not in codec_names():
            raise ValueError(f"unknown codec {self.name!r}; expected one of {codec_names()} (a codec of another "
                             f"package needs that package installed: entry point group {ENTRY_POINT_GROUP!r})")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ValueError(f"vocab_size must be an int, got {self.vocab_size!r}")
        if not 2 <= self.vocab_size <= MAX_VOCAB:
            raise ValueError(f"vocab_size K={self.vocab_size} outside 2..{MAX_VOCAB}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict, got {type(self.params).__name__}")
        try:
            canon = json.loads(json.dumps(self.params, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"CodecSpec params must be JSON-safe: {exc}") from exc
        if canon != self.params:  # e.g. tuples or non-str keys, which JSON would silently change
            raise ValueError(f"CodecSpec params do not survive a JSON round trip: {self.params!r:.200}")
        object.__setattr__(self, "params", canon)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal specs give equal text."""
        body = {"name": self.name, "vocab_size": self.vocab_size, "params": self.params}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> CodecSpec:
        """Parse :meth:`to_json` output; ValueError naming the problem on malformed input."""
        try:
            body = json.loads(text)
        except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"CodecSpec JSON is unreadable: {exc}") from exc
        if not isinstance(body, dict) or set(body) != {"name", "vocab_size", "params"}:
            got = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise ValueError(f"CodecSpec JSON needs exactly the keys name, vocab_size, params; got {got}")
        if not isinstance(body["name"], str):
            raise ValueError(f"CodecSpec name must be a string, got {body['name']!r}")
        return cls(body["name"], body["vocab_size"], body["params"])


def _as_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Flatten (C order) and validate: integer dtype, every value in [0, K). Returns a 1-D view/copy."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be an integer array, got dtype {arr.dtype} (K={vocab_size})")
    arr = arr.reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        bad = int(np.flatnonzero((arr < 0) | (arr >= vocab_size))[0])
        raise ValueError(f"token id {int(arr[bad])} at flat index {bad} is not in [0, K) with K={vocab_size}")
    return arr


class TokenCodec:
    """Base class of the codecs. ``encode(ids) -> bytes``; ``decode(data, count) -> uint16[count]``.

    encode: ``ids`` any-shape integer array (flattened in C order), values in [0, K), else ValueError
    naming the value, its flat index and K. decode: ``data`` bytes-like, ``count`` tokens expected;
    returns a new writable 1-D ``np.uint16`` array; CodecError (ValueError) on corrupt data.
    """

    name: ClassVar[str]
    _param_keys: ClassVar[frozenset[str]] = frozenset()  # params a spec may carry
    _model_keys: ClassVar[tuple[str, ...]] = ()  # params that are a stored model (see model_bytes)

    def __init__(self, spec: CodecSpec):
        if spec.name != self.name:
            raise ValueError(f"{type(self).__name__} cannot be built from a {spec.name!r} spec")
        unknown = set(spec.params) - self._param_keys
        if unknown:
            raise ValueError(f"codec {self.name!r}: unknown params {sorted(unknown)}")
        self.spec = spec
        self.vocab_size = spec.vocab_size

    def encode(self, ids: np.ndarray) -> bytes:
        return self._encode(_as_ids(ids, self.vocab_size))

    def decode(self, data: bytes, count: int) -> np.ndarray:
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        if count > MAX_DECODE_TOKENS:
            raise CodecError(f"{self.name}: {count} tokens asked for, the cap per call is {MAX_DECODE_TOKENS}")
        out = self._decode(data, int(count))
        if out.shape != (count,):
            raise CodecError(f"{self.name}: decoded {out.size} tokens, expected {count}")
        if count and int(out.max()) >= self.vocab_size:
            raise CodecError(f"{self.name}: corrupt data: decoded id {int(out.max())} >= K={self.vocab_size}")
        return out

    @classmethod
    def fit_params(cls, sample: np.ndarray | None, vocab_size: int, grid: tuple[int, int] | None,
                   **params: Any) -> dict:
        """The spec's params for ``fit_codec``: what this codec learns from ``sample`` (token ids) and the
        options given. The default learns nothing and accepts no options."""
        if params:
            raise ValueError(f"fit_codec({cls.name!r}): unknown params {sorted(params)}")
        return {}

    def _encode(self, ids: np.ndarray) -> bytes:  # ids: validated 1-D integer array
        raise NotImplementedError

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        raise NotImplementedError

    def __reduce__(self) -> tuple:
        """Cross-process copies (Ray, spawn workers) are rebuilt from the spec, never from state. The class
        travels by reference, so unpickling imports (and so registers) the module that defines it."""
        return (_rebuild, (type(self), self.spec))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.vocab_size}, params={sorted(self.spec.params)})"


# -- the registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, type[TokenCodec]] = {}
C = TypeVar("C", bound=type[TokenCodec])


def register_codec(cls: C) -> C:
    """Class decorator: make ``cls`` (a ``TokenCodec`` with a ``name``) the codec of that name. Registering
    another class under a name already taken raises ValueError."""
    name = getattr(cls, "name", None)
    if not (isinstance(cls, type) and issubclass(cls, TokenCodec)) or not isinstance(name, str) or not name:
        raise TypeError(f"register_codec needs a TokenCodec subclass with a name, got {cls!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"codec {name!r} is already registered by {_REGISTRY[name].__module__}."
                         f"{_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def codec_names() -> tuple[str, ...]:
    """Every codec name a spec may use: the built-in ones, then registered and entry-point ones, sorted."""
    extra = sorted((set(_REGISTRY) | set(entry_points(ENTRY_POINT_GROUP))) - set(CODEC_NAMES))
    return (*CODEC_NAMES, *extra)


def codec_class(name: str) -> type[TokenCodec]:
    """The registered codec class of ``name``, importing its entry point the first time it is asked for.
    ValueError naming the codec when neither is there (built-in codecs: import ``storage.codec``)."""
    if name not in _REGISTRY:
        loaded = load_plugin(ENTRY_POINT_GROUP, name, "codec")
        if isinstance(loaded, type) and issubclass(loaded, TokenCodec) and name not in _REGISTRY:
            register_codec(loaded)
    if name not in _REGISTRY:
        raise ValueError(f"codec {name!r} is not registered; known: {sorted(_REGISTRY)} (import the module that "
                         f"defines it, or install its package with a {ENTRY_POINT_GROUP!r} entry point)")
    return _REGISTRY[name]


@functools.lru_cache(maxsize=64)
def _make_cached(spec: CodecSpec) -> TokenCodec:
    return codec_class(spec.name)(spec)


def make_codec(spec: CodecSpec) -> TokenCodec:
    """Rebuild the codec a manifest's spec describes (memoised per spec: cheap to call per block)."""
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"make_codec needs a CodecSpec, got {type(spec).__name__}")
    return _make_cached(spec)


def _rebuild(cls: type[TokenCodec], spec: CodecSpec) -> TokenCodec:
    """Unpickling: ``cls`` was imported (and so registered) to get here."""
    return make_codec(spec) if _REGISTRY.get(spec.name) is cls else cls(spec)
