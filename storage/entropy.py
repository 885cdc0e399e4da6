"""Order-0 token statistics and the static rANS primitives behind the ``rans`` codec.

Nothing here knows about ``CodecSpec``; ``storage.codec`` wraps these functions in a codec class.

Model: a static order-0 categorical distribution over ``{0, ..., K-1}`` stored as the raw integer
symbol counts of the fit sample (``uint32``, length K). :func:`model_probabilities` turns them into
probabilities with a Good-Turing escape: symbols unseen in the sample share the mass
``min(max(N1, 1) / n, ESCAPE_CAP)`` (N1 = number of symbols seen exactly once, n = sample size),
seen symbols keep ``count / n`` of the rest. Only elementwise IEEE float64 operations on the
stored integers are used, so every process derives bit-identical probabilities. constriction's
``Categorical(perfect=False)`` then quantises them to the 24-bit fixed point of its default ANS
coder, giving every symbol at least 2**-24 (so anything in ``[0, K)`` stays encodable). That step is
deterministic for a fixed constriction version; :func:`model_fingerprint` lets a reader check that
its constriction quantises the stored counts exactly as the writer's did.
"""

from __future__ import annotations

import base64
import zlib

import constriction
import numpy as np
import zstandard

_U32_MAX = 0xFFFFFFFF
ESCAPE_CAP = 0.05  # most probability mass set aside for unseen symbols (costs <= 0.074 bit/token)


def symbol_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of each symbol: ``int64`` array of length ``vocab_size``.

    ``ids`` must already hold integers in ``[0, vocab_size)`` (callers validate).
    """
    flat = np.asarray(ids).reshape(-1)
    return np.bincount(flat, minlength=vocab_size).astype(np.int64)


def entropy_from_counts(counts: np.ndarray) -> float:
    """Empirical order-0 entropy in bits per symbol of a count vector (0.0 when empty)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def fit_counts(sample: np.ndarray, vocab_size: int) -> np.ndarray:
    """Frequency model fitted on ``sample``: ``uint32`` counts of length ``vocab_size``.

    Zero counts are kept (see :func:`model_probabilities` for unseen symbols). An empty sample
    gives the uniform model (all ones). Counts above ``2**32 - 1`` are scaled down, keeping every
    seen symbol at >= 1.
    """
    counts = symbol_counts(sample, vocab_size)
    if counts.sum() == 0:
        return np.ones(vocab_size, dtype=np.uint32)
    top = int(counts.max())
    if top > _U32_MAX:
        scaled = np.floor(counts * (_U32_MAX / top)).astype(np.int64)
        counts = np.where(counts > 0, np.maximum(scaled, 1), 0)
    return counts.astype(np.uint32)


def counts_to_text(counts: np.ndarray) -> str:
    """Serialise counts: base64 of zstd-compressed little-endian ``uint32``."""
    raw = np.ascontiguousarray(counts, dtype="<u4").tobytes()
    return base64.b64encode(zstandard.ZstdCompressor(level=19).compress(raw)).decode("ascii")


def counts_from_text(text: str, vocab_size: int) -> np.ndarray:
    """Inverse of :func:`counts_to_text`; ValueError unless it yields ``vocab_size`` counts, not all 0."""
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=4 * vocab_size)
    except (ValueError, UnicodeError, zstandard.ZstdError) as exc:
        raise ValueError(f"rans: counts param is not base64 zstd data: {exc}") from exc
    if len(raw) != 4 * vocab_size:
        raise ValueError(f"rans: counts param holds {len(raw)} bytes, expected 4 * K = {4 * vocab_size}")
    counts = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    if not counts.any():
        raise ValueError("rans: counts param is all zero")
    return counts


def model_probabilities(counts: np.ndarray) -> np.ndarray:
    """float64 probabilities (length K, sum ~1) from integer counts with the Good-Turing escape above."""
    c = np.asarray(counts, dtype=np.int64)
    n, unseen = int(c.sum()), int((c == 0).sum())
    if unseen == 0:
        return c / n
    escape = min(max(int((c == 1).sum()), 1) / n, ESCAPE_CAP)
    return np.where(c > 0, c * ((1.0 - escape) / n), escape / unseen)


def build_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    """The constriction model for integer ``counts`` (deterministic; see module docstring)."""
    return constriction.stream.model.Categorical(model_probabilities(counts), perfect=False)


def rans_encode(symbols: np.ndarray, model: constriction.stream.model.Categorical) -> bytes:
    """Encode ``symbols`` (1-D, values < K) with a static model; returns little-endian uint32 words."""
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), model)
    return coder.get_compressed().astype("<u4", copy=False).tobytes()


def rans_decode(data: bytes, count: int, model: constriction.stream.model.Categorical) -> np.ndarray:
    """Decode ``count`` symbols from :func:`rans_encode` output; 1-D ``int32``.

    ValueError when the length is not a multiple of 4, the data are not valid ANS words, or the
    coder does not end exactly in its initial state after ``count`` symbols (it does for every
    untampered payload; corrupted or truncated payloads almost never do).
    """
    if len(data) % 4:
        raise ValueError(f"rans: payload of {len(data)} bytes is not a whole number of 32-bit words")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(model, count) if count else np.zeros(0, dtype=np.int32)
        empty = coder.is_empty()
    except Exception as exc:
        raise ValueError(f"rans: corrupt payload ({len(data)} bytes, {count} symbols): {exc}") from exc
    except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException(BaseException)
        if type(exc).__name__ != "PanicException":
            raise
        raise ValueError(f"rans: decoder panicked on corrupt payload: {exc}") from exc
    if not empty:
        raise ValueError(
            f"rans: corrupt payload: {len(data)} bytes did not decode to exactly {count} symbols "
            "(coder not empty afterwards)"
        )
    return np.asarray(out, dtype=np.int32)


def model_fingerprint(model: constriction.stream.model.Categorical, vocab_size: int) -> int:
    """CRC32 of the encoding of the probe ``0, 1, ..., K-1`` (depends on every quantised probability)."""
    return zlib.crc32(rans_encode(np.arange(vocab_size, dtype=np.int32), model))
