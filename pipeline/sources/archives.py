"""Index tar and zip archives in place: member names and byte ranges, no member data read.

Tar: headers are read one after another (``tarfile`` over a seekable file: it seeks past each
member's data; GNU long names and pax headers are handled by ``tarfile``). On S3 the file is an
fsspec file with a read-ahead block, so a header costs a ranged GET only when the previous block
did not already hold it. The ILSVRC train tar (an outer tar of ``nXXXXXXXX.tar``) is indexed by
recursing into each inner tar in place: a member's offset is the inner tar's data offset plus its
offset inside the inner tar. Inner tars are indexed on a thread pool (independent GETs).

Zip: the central directory gives each member's local-header offset, compressed size, method and
CRC; the reader (``fetch.read_span``) reads the local header and the data in one range.

Bad input becomes ``reject`` rows, never an exception: an unreadable (corrupt) inner tar, a member
running past the end of a truncated archive, an absolute or ``..`` member name, encrypted zip members.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from pipeline.sources.index import IndexBuilder, unsafe_name
from storage import io as sio

READ_BLOCK = 1 << 20  # read-ahead of the header scan: ~9 ImageNet members per ranged GET
INDEX_THREADS = 16


class Window:
    """Bytes ``start:start+size`` of a seekable binary file, as a file (for a tar inside a tar)."""

    def __init__(self, f: IO[bytes], start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


def open_object(url: str) -> IO[bytes]:
    """A seekable binary file of ``url`` (local file, or fsspec with a read-ahead cache)."""
    if sio.protocol_of(url) == "file":
        return open(sio._path(url), "rb")  # noqa: SIM115  (the caller closes it)
    return sio.filesystem(url).open(sio._path(url), "rb", block_size=READ_BLOCK, cache_type="readahead")


def object_size(url: str) -> int:
    return int(sio.filesystem(url).info(sio._path(url))["size"])


def scan_tar(f: IO[bytes], size: int, url: str, base: int, name_of: Callable[[str], str], out: IndexBuilder,
             what: str, on_member: Callable[[tarfile.TarFile, tarfile.TarInfo], bool] | None = None) -> list:
    """Index the regular members of the tar ``f`` (``size`` bytes, at ``base`` in ``url``) into ``out``.

    name_of: member name -> index name. on_member: called first for each member; returning True
    means it was handled (e.g. a label file read). Returns the nested ``.tar`` members as
    (name, data offset, size) instead of indexing them. A tar that cannot be read at all, or
    that ends early, adds one reject named ``what``."""
    inner = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                bad = unsafe_name(ti.name)
                if bad:
                    out.reject(f"{what}::{ti.name}", url, bad)
                elif ti.offset_data + ti.size > size:
                    out.reject(f"{what}::{ti.name}", url, f"truncated archive: member ends at byte "
                                                          f"{ti.offset_data + ti.size}, the tar has {size}")
                elif ti.name.endswith(".tar"):
                    inner.append((ti.name, base + ti.offset_data, ti.size))
                elif on_member is None or not on_member(tf, ti):
                    out.add(name_of(ti.name), url, offset=base + ti.offset_data, size=ti.size)
                tf.members.clear()  # the scan keeps no TarInfo per member
    except (tarfile.TarError, EOFError, OSError) as err:
        out.reject(what, url, f"corrupt or truncated tar: {err}")
    return inner


def index_tar(url: str, name_of: Callable[[str], str], out: IndexBuilder,
              inner_name_of: Callable[[str, str], str] | None = None,
              on_member: Callable[[tarfile.TarFile, tarfile.TarInfo], bool] | None = None) -> None:
    """Index the tar at ``url``; with ``inner_name_of`` (inner tar name, member name -> index name),
    recurse into its inner ``.tar`` members (the ILSVRC train layout), in parallel."""
    size = object_size(url)
    with open_object(url) as f:
        inner = scan_tar(f, size, url, 0, name_of, out, url, on_member)
    if not inner or inner_name_of is None:
        for name, _, _ in inner:
            out.reject(f"{url}::{name}", url, "a tar inside this tar (only the ILSVRC train tar nests tars)")
        return

    def one(member: tuple[str, int, int]) -> IndexBuilder:
        name, start, length = member
        part = IndexBuilder()
        with open_object(url) as f:
            scan_tar(Window(f, start, length), length, url, start, lambda m: inner_name_of(name, m), part,
                     f"{url}::{name}", on_member)
        return part

    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        for part in pool.map(one, inner):
            out.extend(part)


def index_zip(url: str, name_of: Callable[[str], str], out: IndexBuilder) -> None:
    """Index the zip at ``url`` from its central directory (stored and deflated members)."""
    try:
        with open_object(url) as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        out.reject(url, url, f"corrupt or truncated zip: {err}")
        return
    for zi in infos:
        if zi.is_dir():
            continue
        bad = unsafe_name(zi.filename)
        if bad:
            out.reject(f"{url}::{zi.filename}", url, bad)
        elif zi.flag_bits & 0x1:
            out.reject(f"{url}::{zi.filename}", url, "encrypted zip member")
        elif zi.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            out.reject(f"{url}::{zi.filename}", url, f"zip compression method {zi.compress_type} is not "
                                                      "supported (stored or deflated only)")
        else:
            out.add(name_of(zi.filename), url, offset=zi.header_offset, size=zi.compress_size, kind="zip",
                    method=zi.compress_type, usize=zi.file_size, crc=zi.CRC)
