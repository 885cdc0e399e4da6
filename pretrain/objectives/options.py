"""Filling a frozen config dataclass from a YAML mapping: the one place that turns user values into typed fields.

A leaf module (it imports nothing of vqpt): the objective registry, ``pretrain.config`` (every section of a
training config) and any objective package use it without importing one another.
"""

from __future__ import annotations

import dataclasses

__all__ = ["make_config"]


def make_config(cls: type, options: dict, where: str):
    """Fill dataclass ``cls`` from a mapping. ``where`` is the section (``objective``): an unknown key or a
    value of the wrong type raises ValueError naming ``where.key``; the dataclass checks its ranges."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {options!r}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}; valid keys: {sorted(fields)}")
    converted = {}
    for k, v in options.items():
        typ = fields[k]
        if v is None and "None" in typ:
            converted[k] = v
        elif typ == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{k} must be true or false, got {v!r}")
            converted[k] = v
        elif typ.split(" |")[0] in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{where}.{k} must be a number, got {v!r}")
            if typ.startswith("int") and v != int(v):
                raise ValueError(f"{where}.{k} must be a whole number, got {v!r}")
            converted[k] = float(v) if typ.startswith("float") else int(v)
        else:
            converted[k] = tuple(v) if isinstance(v, list) else v
    return cls(**converted)
