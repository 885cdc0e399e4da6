"""Object-store I/O: URLs to bytes and back, with retries and atomic writes.

Supported URLs: plain paths, ``file://``, ``s3://`` (through s3fs) and ``http(s)://`` (read only).

S3 configuration comes from the environment (or an explicit ``storage_options`` dict), never
from code or logs: the endpoint from ``VQPT_S3_ENDPOINT`` (else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``), credentials from the standard ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` chain that botocore reads itself.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fsspec

log = logging.getLogger("vqpt.storage")

# Errors that mean "the data is not there / not allowed": retrying will not help.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError)
# Libraries whose exceptions are network trouble (they do not all derive from OSError).
_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "fsspec")


CREDENTIALS_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and VQPT_S3_ENDPOINT for a "
                    "non-AWS endpoint")


def is_credentials_error(err: BaseException) -> bool:
    """botocore's "no credentials" errors: retrying cannot help, the user must supply credentials."""
    return bool({cls.__name__ for cls in type(err).__mro__} & {"NoCredentialsError", "PartialCredentialsError"})


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` looks like passing network or server trouble (worth a retry)."""
    if isinstance(err, PERMANENT_ERRORS) or is_credentials_error(err):
        return False
    if isinstance(err, OSError | TimeoutError | ConnectionError):
        return True
    return any(cls.__module__.split(".")[0] in _NETWORK_MODULES for cls in type(err).__mro__)


def protocol_of(url: str) -> str:
    """``"s3"``, ``"http"``, ``"https"`` or ``"file"`` (plain paths are ``"file"``)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def s3_storage_options() -> dict[str, Any]:
    """s3fs options from the environment: the endpoint only; credentials stay with botocore."""
    endpoint = (
        os.environ.get("VQPT_S3_ENDPOINT")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    options: dict[str, Any] = {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(url: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url``, one per process and option set (safe across fork).

    ``storage_options`` go to the fsspec filesystem (for s3: ``client_kwargs``, ``config_kwargs``,
    ``anon``, ...); for s3, ``retries`` sets s3fs's own inner retry count (default 5).
    """
    proto = protocol_of(url)
    options = dict(s3_storage_options() if proto == "s3" else {})
    options.update(storage_options or {})
    cache_key = (proto, repr(sorted(options.items())), os.getpid())
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        inner_retries = options.pop("retries", None) if proto == "s3" else None
        fs = fsspec.filesystem(proto, skip_instance_cache=True, **options)
        if inner_retries is not None:  # s3fs's own retry count is a class attribute, not an argument
            fs.retries = int(inner_retries)
        _FS_CACHE[cache_key] = fs
    return fs


def _path(url: str) -> str:
    """The path part fsspec wants: no scheme for s3 and local files, the whole URL for http."""
    proto = protocol_of(url)
    if proto in ("http", "https"):
        return url
    if proto == "file":
        return url[len("file://"):] if url.startswith("file://") else url
    return url.split("://", 1)[1]


def join(base: str, relative: str) -> str:
    """``base`` (a directory URL) joined with a relative POSIX path."""
    if protocol_of(base) == "file" and "://" not in base:
        return os.path.join(base, *relative.split("/"))
    return base.rstrip("/") + "/" + relative


def dirname(url: str) -> str:
    """The directory URL that holds ``url``."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(url))


def with_retries(
    fn: Callable[[], Any],
    what: str,
    retries: int = 8,
    backoff_s: float = 0.25,
    max_backoff_s: float = 4.0,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> Any:
    """Call ``fn`` until it succeeds; transient errors are retried with exponential backoff.

    Only network-like errors are retried (``is_transient``); missing files, permissions and
    programming errors are raised at once. After ``retries`` failed
    retries the last error is raised as an ``OSError`` naming ``what``.
    """
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:
            if is_credentials_error(err):
                raise PermissionError(f"{what}: no S3 credentials found; {CREDENTIALS_HELP}") from err
            if not is_transient(err):
                raise
            if attempt == retries:
                raise OSError(f"{what}: failed after {retries + 1} attempts: {type(err).__name__}: {err}") from err
            if on_retry is not None:
                on_retry(attempt, err)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
    raise AssertionError("unreachable")


def read_bytes(url: str, storage_options: dict | None = None, retries: int = 8) -> bytes:
    """The whole object at ``url``; transient errors retried (see ``with_retries``)."""
    if protocol_of(url) == "file":
        with open(_path(url), "rb") as f:
            return f.read()
    fs = filesystem(url, storage_options)

    def note(attempt: int, err: BaseException) -> None:
        log.warning("retrying read of %s (attempt %d): %s: %s", url, attempt + 1, type(err).__name__, err)

    return with_retries(lambda: fs.cat_file(_path(url)), f"reading {url}", retries=retries, on_retry=note)


def read_range(url: str, start: int, end: int, storage_options: dict | None = None, retries: int = 8) -> bytes:
    """Bytes ``start:end`` of the object at ``url`` (one ranged GET on S3/http); retried like ``read_bytes``."""
    if protocol_of(url) == "file":
        with open(_path(url), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs = filesystem(url, storage_options)
    return with_retries(lambda: fs.cat_file(_path(url), start=start, end=end), f"reading {url}[{start}:{end}]",
                        retries=retries)


def _umask() -> int:
    """The process umask, read without changing it (``/proc``), else by the set-and-restore dance."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None, retries: int = 8) -> None:
    """Write ``data`` so that readers see either nothing or all of it.

    Local: a temp file in the same directory, fsync, then ``os.replace``; the file gets the mode a
    plain ``open()`` would give (0666 less the umask), not the temp file's private 0600, so datasets
    can be shared between users. S3: one complete PUT (S3 never exposes a partial object).
    """
    proto = protocol_of(url)
    if proto == "file":
        path = _path(url)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    if proto in ("http", "https"):
        raise ValueError(f"cannot write to {url}: http(s) URLs are read-only; use a path or s3://")
    fs = filesystem(url, storage_options)
    with_retries(lambda: fs.pipe_file(_path(url), data), f"writing {url}", retries=retries)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object exists at ``url``."""
    if protocol_of(url) == "file":
        return os.path.exists(_path(url))
    fs = filesystem(url, storage_options)
    return bool(with_retries(lambda: fs.exists(_path(url)), f"checking {url}"))


def register_webdataset_s3() -> None:
    """Teach ``webdataset.gopen`` the ``s3://`` scheme through fsspec (webdataset 1.0.2 lacks it).

    Faster than ``pipe:aws s3 cp``: no process per shard. Uses the same environment
    configuration as everything else here.
    """
    import sys

    import webdataset  # noqa: F401 - imports webdataset.gopen

    gopen = sys.modules["webdataset.gopen"]

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
        if mode != "rb":
            raise ValueError(f"{url}: only mode 'rb' is supported for s3 in webdataset")
        return filesystem(url).open(_path(url), "rb")

    gopen.gopen_schemes["s3"] = gopen_s3
