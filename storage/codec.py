"""Token codecs: VQ token ids <-> bytes, plus lossless codecs for segmentation label maps.

A codec turns a flat stream of token ids in ``[0, K)`` (typically every 32x32 grid of a block of
~256 images, concatenated) into bytes and back. ``CodecSpec`` is everything a manifest stores to
rebuild the same codec in another process (``make_codec``); ``fit_codec`` trains what a codec
needs (zstd dictionary, rANS frequency model) from sample tokens.

Codecs (``CODEC_NAMES``):

- ``raw16``: little-endian uint16 per token.
- ``bitpack``: ``ceil(log2 K)`` bits per token, MSB-first, zero-padded to a whole byte, no header.
- ``seit``: SeiT's escape-byte scheme then gzip -9 (see :class:`SeitCodec`).
- ``zstd``: uint8 (K <= 256) or little-endian uint16, zstd frame at ``level`` with content size and
  checksum, optionally with a trained dictionary.
- ``rans``: static order-0 rANS (constriction); see ``storage.entropy``.
- ``zstd2d``: grid prediction (each token: "same as left", "same as above" or a literal), then zstd
  on the mode bytes and on the literals' byte planes; see :class:`Zstd2dCodec`. Real VQ token maps
  repeat their neighbours often, which order-0 coding cannot use: this is the default codec.

Decoding returns a fresh, writable 1-D ``np.uint16`` array and raises :class:`CodecError` (a
ValueError) for corrupt or short data wherever that is detectable: lengths, value ranges, zstd
and gzip checksums, and the rANS end state. Codec objects are immutable and thread-safe.
"""

from __future__ import annotations

import base64
import gzip
import threading
import zlib
from typing import Any

import numpy as np
import zstandard

from storage import entropy
from storage.codec_base import (  # noqa: F401  (re-exported: the interface lives beside the codecs for users)
    CODEC_NAMES,
    ENTRY_POINT_GROUP,
    MAX_DECODE_TOKENS,
    MAX_VOCAB,
    CodecError,
    CodecSpec,
    TokenCodec,
    _as_ids,
    codec_class,
    codec_names,
    make_codec,
    register_codec,
)

DEFAULT_CODEC = "zstd2d"  # smallest on real tokens, and fast to decode (bench/storage.py)


@register_codec
class Raw16Codec(TokenCodec):
    """2 bytes per token, little-endian uint16."""

    name = "raw16"

    def _encode(self, ids: np.ndarray) -> bytes:
        return ids.astype("<u2").tobytes()

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        if len(data) != 2 * count:
            raise CodecError(f"raw16: {len(data)} bytes for {count} tokens, expected {2 * count}")
        return np.frombuffer(data, dtype="<u2").astype(np.uint16)


@register_codec
class BitpackCodec(TokenCodec):
    """``b = ceil(log2 K)`` bits per token, MSB first, last byte zero-padded: ``ceil(n*b/8)`` bytes."""

    name = "bitpack"

    def __init__(self, spec: CodecSpec):
        super().__init__(spec)
        self.bits = (self.vocab_size - 1).bit_length()

    def _encode(self, ids: np.ndarray) -> bytes:
        big = ids.astype(">u2").view(np.uint8).reshape(-1, 2)
        bitmat = np.unpackbits(big, axis=1)[:, 16 - self.bits :]
        return np.packbits(bitmat.reshape(-1)).tobytes()

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        b = self.bits
        need = (count * b + 7) // 8
        if len(data) != need:
            raise CodecError(f"bitpack: {len(data)} bytes for {count} tokens of {b} bits, expected {need}")
        buf = np.zeros(need + 2, dtype=np.uint32)  # 2 spare bytes so every 3-byte window exists
        buf[:need] = np.frombuffer(data, dtype=np.uint8)
        pos = np.arange(count, dtype=np.int64) * b
        at = pos >> 3
        window = (buf[at] << 16) | (buf[at + 1] << 8) | buf[at + 2]  # 24 bits >= b + 7
        shift = (24 - b - (pos & 7)).astype(np.uint32)
        out = ((window >> shift) & ((1 << b) - 1)).astype(np.uint16)
        pad = need * 8 - count * b
        if pad and int(buf[need - 1]) & ((1 << pad) - 1):
            raise CodecError("bitpack: padding bits of the last byte are not zero")
        return out


@register_codec
class SeitCodec(TokenCodec):
    """SeiT (naver-ai/seit) storage: escape bytes, then gzip -9 of the whole byte stream.

    Our reading of SeiT's ``get_data_index_of``: a token id ``v`` is written as ``v // 255`` escape
    bytes 255 followed by one byte ``v % 255`` (so ids < 255 take 1 byte, 255..509 take
    ``[255, v - 255]``). For K <= 510 this is byte-identical to SeiT (their codebook has 391 codes);
    SeiT's decoder *resets* on a repeated escape, ours *accumulates* (each 255 adds 255), which is
    what lets larger K stay lossless (id 65535 costs 258 bytes before gzip). gzip header has mtime 0.
    """

    name = "seit"

    def _encode(self, ids: np.ndarray) -> bytes:
        ids = ids.astype(np.int64)
        escapes, rest = np.divmod(ids, 255)
        ends = np.cumsum(escapes + 1) - 1
        stream = np.full(int(ends[-1]) + 1 if ids.size else 0, 255, dtype=np.uint8)
        stream[ends] = rest
        return gzip.compress(stream.tobytes(), compresslevel=9, mtime=0)

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        inflater = zlib.decompressobj(wbits=31)  # gzip container; checks CRC32 and length
        cap = count * ((self.vocab_size - 1) // 255 + 1)  # the longest stream ``count`` ids can make
        try:
            raw = inflater.decompress(data, cap + 1)  # bounded: a gzip bomb stops here
        except zlib.error as exc:
            raise CodecError(f"seit: gzip stream is corrupt: {exc}") from exc
        if len(raw) > cap:
            raise CodecError(f"seit: gzip stream inflates past {cap} bytes, the most {count} tokens with "
                             f"K={self.vocab_size} can take")
        if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
            raise CodecError("seit: gzip stream is truncated or followed by extra bytes")
        stream = np.frombuffer(raw, dtype=np.uint8)
        ends = np.flatnonzero(stream != 255)
        if ends.size != count or (stream.size and (not count or ends[-1] != stream.size - 1)):
            raise CodecError(f"seit: {ends.size} tokens (or a trailing escape), expected {count}")
        ids = (np.diff(ends, prepend=-1) - 1) * 255 + stream[ends]  # int64: check before narrowing
        if count and int(ids.max()) >= self.vocab_size:
            raise CodecError(f"seit: corrupt data: decoded id {int(ids.max())} >= K={self.vocab_size}")
        return ids.astype(np.uint16)


@register_codec
class ZstdCodec(TokenCodec):
    """uint8 (K <= 256) or little-endian uint16 tokens in one zstd frame (content size + checksum).

    params: ``level`` (int, default 19), optional ``dict`` (base64 zstd dictionary).
    """

    name = "zstd"
    _param_keys = frozenset({"level", "dict"})
    _model_keys = ("dict",)

    def __init__(self, spec: CodecSpec):
        super().__init__(spec)
        level = spec.params.get("level", 19)
        if isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 22:
            raise ValueError(f"zstd: level must be an int in -7..22, got {level!r}")
        self.level = level
        self.dtype = np.dtype(np.uint8) if self.vocab_size <= 256 else np.dtype("<u2")
        self._dict: zstandard.ZstdCompressionDict | None = None
        if "dict" in spec.params:
            try:
                raw = base64.b64decode(str(spec.params["dict"]).encode("ascii"), validate=True)
            except (ValueError, UnicodeError) as exc:
                raise ValueError(f"zstd: dict param is not base64: {exc}") from exc
            self._dict = zstandard.ZstdCompressionDict(raw)
        self._local = threading.local()  # ZstdDecompressor objects are not shared between threads

    @classmethod
    def fit_params(cls, sample: np.ndarray | None, vocab_size: int, grid: tuple[int, int] | None,
                   **params: Any) -> dict:
        """``level`` (default 19); ``dict`` (bytes or base64 str: use this dictionary) or ``dict_size`` (> 0:
        train a dictionary of that many bytes on ``sample`` cut into ``dict_chunk``-token pieces, default
        1024 = one 32x32 grid). Default: no dictionary."""
        spec_params: dict[str, Any] = {"level": params.pop("level", 19)}
        given, dict_size = params.pop("dict", None), int(params.pop("dict_size", 0))
        chunk = int(params.pop("dict_chunk", 1024))
        super().fit_params(sample, vocab_size, grid, **params)  # refuses what is left
        if given is not None:
            spec_params["dict"] = given if isinstance(given, str) else base64.b64encode(given).decode("ascii")
        elif dict_size > 0:
            ids = _as_ids(sample, vocab_size).astype(np.uint8 if vocab_size <= 256 else "<u2")
            pieces = [ids[i : i + chunk].tobytes() for i in range(0, ids.size, chunk)]
            try:
                trained = zstandard.train_dictionary(dict_size, pieces, level=int(spec_params["level"]))
            except zstandard.ZstdError as exc:
                raise ValueError(f"zstd: dictionary training failed on {len(pieces)} pieces: {exc}") from exc
            spec_params["dict"] = base64.b64encode(trained.as_bytes()).decode("ascii")
        return spec_params

    def _encode(self, ids: np.ndarray) -> bytes:
        cctx = zstandard.ZstdCompressor(level=self.level, dict_data=self._dict, write_checksum=True)
        return cctx.compress(ids.astype(self.dtype).tobytes())

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor(dict_data=self._dict)
        need = count * self.dtype.itemsize
        try:  # check the declared size first: a corrupt header must not trigger a huge allocation
            declared = zstandard.frame_content_size(data)
            if declared != need:
                raise CodecError(f"zstd: frame declares {declared} bytes, expected {need} for {count} tokens")
            raw = dctx.decompress(data, max_output_size=need, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: corrupt frame ({len(data)} bytes): {exc}") from exc
        if len(raw) != need:
            raise CodecError(f"zstd: frame holds {len(raw)} bytes, expected {need} for {count} tokens")
        return np.frombuffer(raw, dtype=self.dtype).astype(np.uint16)


@register_codec
class RansCodec(TokenCodec):
    """Static order-0 rANS (constriction, 32-bit words, 24-bit probabilities); payload = LE uint32 words.

    params: ``counts`` (base64 zstd LE uint32 symbol counts, see ``storage.entropy``) and
    ``fingerprint`` (CRC32 of a probe encoding; a reader whose constriction quantises the counts
    differently refuses the spec instead of mis-decoding).
    """

    name = "rans"
    _param_keys = frozenset({"counts", "fingerprint"})
    _model_keys = ("counts",)

    def __init__(self, spec: CodecSpec):
        super().__init__(spec)
        if "counts" not in spec.params or "fingerprint" not in spec.params:
            raise ValueError("rans: spec needs params 'counts' and 'fingerprint' (build it with fit_codec)")
        if not isinstance(spec.params["counts"], str):
            raise ValueError("rans: counts param must be a base64 string")
        self.counts = entropy.counts_from_text(spec.params["counts"], self.vocab_size)
        self._model = entropy.build_model(self.counts)
        got = entropy.model_fingerprint(self._model, self.vocab_size)
        if got != spec.params["fingerprint"]:
            raise ValueError(
                f"rans: model fingerprint {got} != stored {spec.params['fingerprint']!r}; this "
                "constriction build quantises the stored counts differently from the writer's"
            )

    @classmethod
    def fit_params(cls, sample: np.ndarray | None, vocab_size: int, grid: tuple[int, int] | None,
                   **params: Any) -> dict:
        """Order-0 counts of ``sample``; symbols absent from it share a Good-Turing escape mass (see
        ``storage.entropy``), so they stay encodable. An empty sample gives the uniform model."""
        super().fit_params(sample, vocab_size, grid, **params)
        ids = _as_ids(sample if sample is not None else np.zeros(0, np.int64), vocab_size)
        counts = entropy.fit_counts(ids, vocab_size)
        return {"counts": entropy.counts_to_text(counts),
                "fingerprint": entropy.model_fingerprint(entropy.build_model(counts), vocab_size)}

    def _encode(self, ids: np.ndarray) -> bytes:
        return entropy.rans_encode(ids, self._model)

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        try:
            return entropy.rans_decode(data, count, self._model).astype(np.uint16)
        except ValueError as exc:
            raise CodecError(str(exc)) from exc


@register_codec
class Zstd2dCodec(TokenCodec):
    """Grid-predictive coding: the stream is read as (h, w) grids; each token gets a mode.

    mode 0: equals its left neighbour; 1: equals the token above (and not the left one);
    2: literal. Payload: u32 LE length of part 1 | part 1 = zstd(modes, one byte per token) |
    part 2 = zstd(literals as byte planes: low bytes, then high bytes when K > 256). Tokens
    after the last whole grid (views of another shape) are literals. Decoding places the
    literals, then resolves copies row by row for all grids at once (vectorised over grids and
    columns; ``h`` numpy steps per call). params: ``grid`` [h, w], ``level`` (default 19).
    """

    name = "zstd2d"
    _param_keys = frozenset({"grid", "level"})

    def __init__(self, spec: CodecSpec):
        super().__init__(spec)
        grid = spec.params.get("grid")
        if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
            raise ValueError(f"zstd2d: params.grid must be [h, w] positive ints, got {grid!r}")
        self.h, self.w = grid
        self.level = int(spec.params.get("level", 19))
        self._local = threading.local()

    @classmethod
    def fit_params(cls, sample: np.ndarray | None, vocab_size: int, grid: tuple[int, int] | None,
                   **params: Any) -> dict:
        """``grid`` (h, w) required, ``level`` (default 19); nothing is learned from ``sample``."""
        if grid is None:
            raise ValueError("fit_codec('zstd2d'): pass grid=(h, w), the token grid the stream is made of")
        level = int(params.pop("level", 19))
        super().fit_params(sample, vocab_size, grid, **params)
        return {"grid": [int(grid[0]), int(grid[1])], "level": level}

    def _modes(self, ids: np.ndarray) -> np.ndarray:
        cell = self.h * self.w
        main = ids.size - ids.size % cell
        g = ids[:main].reshape(-1, self.h, self.w)
        modes = np.full(ids.size, 2, dtype=np.uint8)
        m = modes[:main].reshape(g.shape)
        up = np.zeros(g.shape, dtype=bool)
        up[:, 1:, :] = g[:, 1:, :] == g[:, :-1, :]
        left = np.zeros(g.shape, dtype=bool)
        left[:, :, 1:] = g[:, :, 1:] == g[:, :, :-1]
        m[up] = 1
        m[left] = 0
        return modes

    def _planes(self, lit: np.ndarray) -> bytes:
        if self.vocab_size <= 256:
            return lit.astype(np.uint8).tobytes()
        return (lit & 0xFF).astype(np.uint8).tobytes() + (lit >> 8).astype(np.uint8).tobytes()

    def _encode(self, ids: np.ndarray) -> bytes:
        modes = self._modes(ids)
        cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        part1 = cctx.compress(modes.tobytes())
        part2 = cctx.compress(self._planes(ids[modes == 2]))
        return len(part1).to_bytes(4, "little") + part1 + part2

    def _unzstd(self, data: bytes, need: int, what: str) -> bytes:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            if zstandard.frame_content_size(data) != need:
                raise CodecError(f"zstd2d: {what} frame does not declare {need} bytes")
            return dctx.decompress(data, max_output_size=need, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd2d: corrupt {what} frame: {exc}") from exc

    def _decode(self, data: bytes, count: int) -> np.ndarray:
        if len(data) < 4:
            raise CodecError("zstd2d: payload shorter than its 4-byte header")
        n1 = int.from_bytes(data[:4], "little")
        if 4 + n1 > len(data):
            raise CodecError(f"zstd2d: mode frame of {n1} bytes overruns the {len(data)}-byte payload")
        modes = np.frombuffer(self._unzstd(data[4 : 4 + n1], count, "mode"), dtype=np.uint8)
        if count and int(modes.max()) > 2:
            raise CodecError("zstd2d: corrupt modes (value > 2)")
        is_lit = modes == 2
        n_lit = int(is_lit.sum())
        planes = 1 if self.vocab_size <= 256 else 2
        raw = np.frombuffer(self._unzstd(data[4 + n1 :], n_lit * planes, "literal"), dtype=np.uint8)
        lit = raw[:n_lit].astype(np.uint16)
        if planes == 2:
            lit |= raw[n_lit:].astype(np.uint16) << 8
        out = np.zeros(count, dtype=np.uint16)
        out[is_lit] = lit
        cell = self.h * self.w
        main = count - count % cell
        if (modes[main:] != 2).any():
            raise CodecError("zstd2d: corrupt modes (a copy outside a whole grid)")
        n, h, w = main // cell, self.h, self.w
        m = modes[:main].reshape(n, h, w)
        if (m[:, :, 0] == 0).any() or (m[:, 0, :] == 1).any():
            raise CodecError("zstd2d: corrupt modes (a copy from outside the grid)")
        # Rows of all grids side by side: (h, n * w). A left-copy run takes the value at the
        # nearest column to its left that is not a left-copy (``source``, found for every row
        # at once); an up-copy takes the finished row above. One gather per row.
        # (column 0 is never a left-copy, so the running maximum never crosses into another grid)
        m_rows = np.ascontiguousarray(m.transpose(1, 0, 2)).reshape(h, n * w)
        source = np.where(m_rows != 0, np.arange(n * w, dtype=np.int32), np.int32(0))
        np.maximum.accumulate(source, axis=1, out=source)
        from_up = m_rows == 1
        base = np.ascontiguousarray(out[:main].reshape(n, h, w).transpose(1, 0, 2)).reshape(h, n * w)
        rows = np.empty_like(base)
        for i in range(h):
            filled = np.where(from_up[i], rows[i - 1], base[i]) if i else base[i]
            np.take(filled, source[i], out=rows[i])
        out[:main] = rows.reshape(h, n, w).transpose(1, 0, 2).reshape(-1)
        return out


def fit_codec(name: str, sample: np.ndarray | None, vocab_size: int, grid: tuple[int, int] | None = None,
              **params: Any) -> TokenCodec:
    """Build codec ``name`` for K = ``vocab_size``, training its model on ``sample`` token ids.

    ``grid`` (h, w) is the token grid the streams are made of; codecs that do not use it ignore it. What
    each codec learns and which options it takes is its ``fit_params`` (unknown options: ValueError):

    - ``raw16``, ``bitpack``, ``seit``: nothing to fit; ``sample`` is ignored, no params accepted.
    - ``zstd``: ``level`` (default 19); ``dict`` or ``dict_size`` / ``dict_chunk`` (a trained dictionary).
    - ``zstd2d``: ``grid`` (h, w) required, ``level`` (default 19); nothing fitted.
    - ``rans``: order-0 counts of ``sample`` with an escape mass for absent symbols.
    """
    cls = codec_class(name)
    return cls(CodecSpec(name, vocab_size, cls.fit_params(sample, vocab_size, grid, **params)))


def order0_entropy_bits(ids: np.ndarray, vocab_size: int) -> float:
    """Empirical order-0 entropy of ``ids`` (values in [0, K)) in bits per token; 0.0 when empty."""
    arr = _as_ids(ids, vocab_size)
    return entropy.entropy_from_counts(entropy.symbol_counts(arr, vocab_size))


def model_bytes(codec: TokenCodec) -> int:
    """Bytes the codec's model costs in the manifest: length of its base64 model params (dict, counts).

    0 for codecs without a model. Amortised cost per token = model_bytes / tokens sharing the spec.
    """
    return sum(len(codec.spec.params[k]) for k in codec._model_keys if k in codec.spec.params)
