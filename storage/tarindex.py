"""A shard's tar container, read: where its blocks lie, and their bytes, checked.

``storage.shard`` writes plain POSIX ustar members (regular files, names under 100 characters, no
time or owner noise) followed by tar's two zero blocks. ``members(data)`` reads such an archive's
headers with a few byte comparisons each (``tarfile`` costs ~0.2 ms per member, as much as decoding
a few samples), checksums included. Anything else (GNU or pax headers, name prefixes, a truncated
archive, a bad checksum) gives None, and the caller reads the archive with ``tarfile``, which
names what is wrong. ``BlockSpan`` is one member's payload: where it starts and how long it is.
``iter_block_bytes`` yields each block's bytes with the container checked (ShardError otherwise).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from storage.errors import ShardError

BLOCK_EXT = "vqb"
TAR_BLOCK = 512
_ZERO = bytes(TAR_BLOCK)
_MAGIC = b"ustar\x0000"  # POSIX ustar magic + version, what tarfile.USTAR_FORMAT writes


@dataclass(frozen=True)
class BlockSpan:
    """A tar member: ``name``, and its payload at bytes ``[offset, offset + size)`` of the shard."""

    name: str
    offset: int
    size: int


def parse_member(header: bytes) -> tuple[str, int] | None:
    """(name, payload size) of a plain ustar header of a regular file; None for anything else
    (another tar dialect, a link, a name prefix, a bad checksum, a zero block)."""
    if len(header) != TAR_BLOCK or header[257:265] != _MAGIC or header[156:157] not in (b"0", b"\0"):
        return None
    if any(header[345:500]) or header[124] & 0x80:  # a name prefix; a base-256 size
        return None
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the checksum field counts as spaces
        return None
    return name, size


def members(data: bytes) -> list[BlockSpan] | None:
    """Every member of tar bytes up to its end marker, when the archive is plain ustar (see the
    module docstring) and complete; None otherwise (read it with ``tarfile`` then)."""
    out = []
    pos, end = 0, len(data)
    while pos + TAR_BLOCK <= end:
        header = data[pos : pos + TAR_BLOCK]
        if header == _ZERO:
            return out
        parsed = parse_member(header)
        if parsed is None or pos + TAR_BLOCK + parsed[1] > end:
            return None
        out.append(BlockSpan(parsed[0], pos + TAR_BLOCK, parsed[1]))
        pos += TAR_BLOCK + -(-parsed[1] // TAR_BLOCK) * TAR_BLOCK
    return None  # no end marker: truncated


def payload_offsets(block_bytes: tuple[int, ...] | list[int]) -> list[int]:
    """Where each member's payload starts in a tar of members of these payload lengths, one after
    another from byte 0 (each member: a header block, then its payload padded to whole blocks)."""
    out, pos = [], 0
    for size in block_bytes:
        out.append(pos + TAR_BLOCK)
        pos += TAR_BLOCK + -(-int(size) // TAR_BLOCK) * TAR_BLOCK
    return out


def _check_member(name: str, url: str, regular: bool = True) -> None:
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise ShardError(url, f"tar member with unsafe path {name!r}")
    if not regular:
        raise ShardError(url, f"tar member {name!r} is not a regular file")
    if not name.endswith("." + BLOCK_EXT):
        raise ShardError(url, f"unexpected tar member {name!r} (expected *.{BLOCK_EXT})")


def iter_block_bytes(data: bytes, url: str) -> Iterator[tuple[str, bytes]]:
    """(member name, block bytes) for each block in shard bytes, with the container checked.

    Raises ShardError for a truncated or corrupt tar, members with absolute or ``..`` paths,
    non-regular members, or members that are not blocks. Plain ustar (what ``ShardWriter``
    writes) is read by ``members``; anything else by ``tarfile``.
    """
    yield from block_bytes(data, url, as_views=False)


def block_bytes(data: bytes, url: str, as_views: bool) -> Iterator[tuple[str, bytes | memoryview]]:
    """``iter_block_bytes``; with ``as_views``, plain ustar members come as memoryviews of ``data``
    (no copy; every decoder reads any bytes-like)."""
    spans = members(data)
    if spans is not None:
        whole = memoryview(data) if as_views else data
        for span in spans:
            _check_member(span.name, url)
            yield span.name, whole[span.offset : span.offset + span.size]
        return
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name
                _check_member(name, url, member.isreg())
                f = tar.extractfile(member)
                payload = f.read() if f is not None else b""
                if len(payload) != member.size:
                    raise ShardError(url, f"truncated inside member {name!r}")
                yield name, payload
    except tarfile.TarError as err:
        raise ShardError(url, f"not a readable tar (truncated or corrupt): {err}") from err
