"""Strict, frozen config dataclasses.

Every job-definition class is a :func:`spec`: a frozen dataclass whose
constructor turns an unknown keyword into a :class:`~slmbatch.errors.ConfigError`
naming ``Class.option`` and listing the known options, and whose
``_check()`` hook validates values at definition time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from typing_extensions import dataclass_transform

from .errors import ConfigError


@dataclass_transform(frozen_default=True)
def spec(cls):
    """Decorate a class into a strict frozen dataclass (see module docstring)."""
    cls = dataclasses.dataclass(frozen=True, eq=True)(cls)
    init = cls.__init__
    known = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}.{unknown[0]}",
                f"unknown option {unknown[0]!r}; known options: {', '.join(known)}",
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def freeze(value: Any) -> Any:
    """Deep-copy mappings and sequences into read-only, hashable-enough forms."""
    if isinstance(value, Mapping):
        return _FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


class _FrozenDict(dict):
    """A dict that refuses mutation, so specs stay immutable after validation."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("job specs are immutable; build a new one with dataclasses.replace()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

    def __reduce__(self):
        return (_FrozenDict, (dict(self),))


def set_field(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen spec inside its ``__post_init__``."""
    object.__setattr__(obj, name, value)


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(field, message)


def check_identifier(value: Any, field: str) -> None:
    require(
        isinstance(value, str) and value.isidentifier(),
        field,
        f"must be a Python-identifier-like name (letters, digits, _), got {value!r}",
    )


def check_unit_interval(value: Any, field: str) -> None:
    require(
        value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0),
        field,
        f"must be a number in [0, 1], got {value!r}",
    )


def check_positive_int(value: Any, field: str) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field,
        f"must be a positive integer, got {value!r}",
    )


def check_non_negative(value: Any, field: str) -> None:
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
        field,
        f"must be a non-negative number, got {value!r}",
    )


def check_strings(values: Any, field: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    require(
        isinstance(values, Sequence) and not isinstance(values, str),
        field,
        f"must be a list of strings, got {values!r}",
    )
    require(allow_empty or len(values) > 0, field, "must not be empty")
    for i, v in enumerate(values):
        require(isinstance(v, str) and v.strip() != "", f"{field}[{i}]", f"must be a non-empty string, got {v!r}")
    seen: set[str] = set()
    for v in values:
        require(v not in seen, field, f"duplicate value {v!r}")
        seen.add(v)
    return tuple(values)


def check_positive_number(value: Any, field: str) -> None:
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value),
        field,
        f"must be a positive number, got {value!r}",
    )


def check_optional_rate(value: Any, field: str) -> None:
    require(
        value is None
        or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)),
        field,
        f"must be a positive number or None (no limit), got {value!r}",
    )
