"""Plug-ins of other packages, found through entry points: codecs here, tokenizers and objectives above.

A package declares ``[project.entry-points."vqpt.<kind>"] name = "module:attr"`` (or just ``"module"``) in
its pyproject.toml; once it is installed, vqpt imports that module the first time ``name`` is asked for,
in whatever process asks (a trainer rank, a Ray worker, a DataLoader worker). The module registers what
it defines (``register_codec``, ``register_tokenizer``, ``register_objective``). See docs/extending.md.
"""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["entry_points", "load_plugin"]


@functools.cache
def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """name -> entry point of ``group``, read once per process (``entry_points.cache_clear()`` rereads); nothing
    is imported."""
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def load_plugin(group: str, name: str, what: str) -> object | None:
    """What the entry point ``name`` of ``group`` names, imported (its module registers it); None when there is
    no such entry point. An import that fails raises ValueError naming ``what``, the entry point and the error."""
    ep = entry_points(group).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except Exception as err:
        raise ValueError(f"{what} {name!r}: its entry point {ep.value} ({group}) failed to import: "
                         f"{type(err).__name__}: {err}") from err
