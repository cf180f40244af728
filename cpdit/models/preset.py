# Named configurations: a family's presets are entries in code, and a job's YAML holds only its differences.
from __future__ import annotations

from dataclasses import fields, replace


def from_preset(presets: dict, what: str, name: str, overrides: dict):
    """presets[name] with the non-None `overrides` applied; unknown names and fields are errors that list the
    choices."""
    if name not in presets:
        raise ValueError(f"{what} preset {name!r} is unknown; choose one of {', '.join(presets)}")
    base = presets[name]
    known = {f.name for f in fields(base)}
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ValueError(f"unknown {type(base).__name__} field(s) {bad}; known: {sorted(known)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
