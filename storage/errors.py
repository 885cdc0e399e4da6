"""Errors raised by storage/: each names the shard, manifest or field at fault."""


class StorageError(ValueError):
    """Base class: bad or unreadable stored data. Subclasses ValueError so callers may catch either."""


class ManifestError(StorageError):
    """A manifest is missing, malformed, or names unsafe shard URLs."""


class ShardError(StorageError):
    """A shard is truncated, corrupt, fails its hash, or cannot be read after retries.

    ``url`` is the shard's full URL; ``reason`` says what is wrong.
    """

    def __init__(self, url: str, reason: str):
        super().__init__(f"shard {url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self):  # pickles whole (a DataLoader worker hands it to the main process)
        return type(self), (self.url, self.reason), self.__dict__


class ShardUnreachable(ShardError):
    """A shard whose store did not answer (time-outs, refused connections, 5xx) until its retries or
    deadline ran out: not the shard's fault, and every further shard of that store would wait as long,
    so ``on_error="skip"`` does not skip it."""


class FingerprintMismatch(StorageError):
    """The manifest's tokenizer fingerprint is not the one the caller expects."""
