"""Where a shard's blocks lie inside its tar: member headers parsed directly.

``storage.shard`` writes plain POSIX ustar members (regular files, names under 100 characters, no
time or owner noise) followed by tar's two zero blocks. ``members(data)`` reads such an archive's
headers with a few byte comparisons each (``tarfile`` costs ~0.2 ms per member, as much as decoding
a few samples), checksums included. Anything else (GNU or pax headers, name prefixes, a truncated
archive, a bad checksum) gives None, and the caller reads the archive with ``tarfile``, which
names what is wrong. ``BlockSpan`` is one member's payload: where it starts and how long it is.
"""

from __future__ import annotations

from dataclasses import dataclass

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
