"""Range and choice checks for config dataclasses, raised from their ``__post_init__``.

Each section validates itself, so a component built from its own config (a stream, a head, the
schedules) is checked the same way whether it came from a YAML recipe or from Python. The message
names the full config key, which ``config.load_config`` passes on to the user unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

__all__ = ["check_fields"]


def check_fields(obj: Any, section: str, *, positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                 unit: Iterable[str] = (), choices: Mapping[str, Iterable[Any]] | None = None) -> None:
    """Raise ``ValueError`` naming ``section.field`` for the first value out of range.

    ``positive``: > 0; ``non_negative``: >= 0; ``unit``: in [0, 1]; ``choices``: one of the listed
    values. ``None`` passes the range checks (an optional value left unset).
    """
    def key(name: str) -> str:
        return f"{section}.{name}" if section else name

    rules = [(positive, lambda v: v > 0, "must be > 0"), (non_negative, lambda v: v >= 0, "must be >= 0"),
             (unit, lambda v: 0 <= v <= 1, "must be in [0, 1]")]
    for names, ok, says in rules:
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN fails every range; inf must too
                raise ValueError(f"config key '{key(name)}' must be a finite number, got {value}")
            if value is not None and not ok(value):
                raise ValueError(f"config key '{key(name)}' {says}, got {value}")
    for name, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        if getattr(obj, name) not in allowed:
            raise ValueError(f"config key '{key(name)}' is {getattr(obj, name)!r}; allowed values: "
                             f"{', '.join('null' if a is None else str(a) for a in allowed)}")
