"""A local S3 endpoint (moto's server on 127.0.0.1) for the quickstart and the tests.

While started, it points ``VQPT_S3_ENDPOINT`` (what ``storage.io`` reads) and dummy AWS
credentials at itself; ``close()`` restores the environment. ``stop()`` / ``start()`` simulate an
outage: moto keeps its in-memory buckets across a restart in the same process.
"""

from __future__ import annotations

import logging
import os

from storage.net import free_port  # re-exported: the quickstart and the tests import it from here

_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "VQPT_S3_ENDPOINT")


class LocalS3:
    """``with LocalS3() as s3: s3.bucket("name")`` -> ``"s3://name"``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._saved: dict[str, str | None] | None = None

    def start(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        if self._saved is None:
            self._saved = {k: os.environ.get(k) for k in _ENV_KEYS}
            os.environ.update(AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local",
                              AWS_DEFAULT_REGION="us-east-1", VQPT_S3_ENDPOINT=self.endpoint)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per HTTP request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns its ``s3://`` URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def close(self) -> None:
        self.stop()
        for k, v in (self._saved or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
