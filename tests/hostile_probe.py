"""Reads crafted datasets in one process and reports, per dataset, what each reader did and its
peak memory above its baseline: ``python -m tests.hostile_probe cases.json results.json``.

cases.json: [{"name", "dir"}] (dir ``CONTROL``: allocate 200 MB, to show the measurement works;
``CALL`` + JSON: call a function, e.g. the tokenise job's item loader on a label-map bomb).
For each: a TokenStream (on_error="raise", then "skip") reads the
whole split, then ``vqpt verify`` runs in-process. Peak RSS is the kernel's VmHWM, reset before
each case through /proc/self/clear_refs, so a case's peak is its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time

CONTROL = "<control: allocate 200 MB>"
CALL = "<call>"  # "<call>" + JSON [target, *args]: run ``module:function(*args)`` instead of the readers


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _error(err: BaseException) -> dict:
    return {"type": type(err).__name__, "message": str(err), "url": getattr(err, "url", None)}


def _stream(split_dir: str, on_error: str) -> dict:
    from storage.stream import TokenStream

    try:
        ds = TokenStream(split_dir, None, partitions=1, shuffle=False, prefetch_shards=0, retries=0,
                         on_error=on_error)
        n = sum(1 for _ in ds)
    except Exception as err:
        return {"error": _error(err)}
    return {"samples": n, "skipped": ds.skipped}


def _verify(split_dir: str) -> dict:
    from vqpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["verify", split_dir])
        except Exception as exc:
            return {"error": _error(exc)}
    return {"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()}


def _control() -> dict:
    """A positive control for the measurement: touch 200 MB, which the peak must show."""
    import numpy as np

    block = np.ones(200 << 20, dtype=np.uint8)
    return {"sum": int(block[::4096].sum())}


def _call(target: str, *args: str) -> dict:
    """``module:function(*args)``: its result (a string) or its error."""
    import importlib

    module, name = target.split(":")
    try:
        return {"result": getattr(importlib.import_module(module), name)(*args)}
    except Exception as err:
        return {"error": _error(err)}


def probe(split_dir: str) -> dict:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _rss_kb("VmRSS")
    start = time.monotonic()
    if split_dir == CONTROL:
        result = _control()
    elif split_dir.startswith(CALL):
        result = _call(*json.loads(split_dir[len(CALL):]))
    else:
        result = {"raise": _stream(split_dir, "raise"), "skip": _stream(split_dir, "skip"),
                  "verify": _verify(split_dir)}
    result["seconds"] = time.monotonic() - start
    result["peak_mb"] = (_rss_kb("VmHWM") - base) / 1024
    return result


def main(argv: list[str]) -> int:
    import storage.stream  # noqa: F401 - imported before the first baseline, like a trainer's reader
    import vqpt.cli  # noqa: F401

    with open(argv[0]) as f:
        cases = json.load(f)
    _verify(cases[0]["dir"])  # warm-up: lazy imports (tqdm, codecs) are not a case's memory
    results = {c["name"]: probe(c["dir"]) for c in cases}
    with open(argv[1], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
