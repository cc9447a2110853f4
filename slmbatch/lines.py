"""Model lines: versioned model directories and the pointer to the one jobs run (:mod:`slmbatch.finetune`).

::

    models/intent/
        v1/  v2/  ...        model directories, each with its card (``slmbatch_card.json``)
        current.json         {"version": "v2", "promoted_at": ..., "replaces": ..., "history": [...]}
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

CARD = "slmbatch_card.json"
POINTER = "current.json"


_NO_DEFAULT: Any = object()


def promoted(line: str | os.PathLike, default: Any = _NO_DEFAULT) -> Any:
    """The directory of the version ``line`` has promoted: ``Model(promoted("models/intent"))`` for a
    classifier line, ``Summarize(..., adapter=promoted("adapters/gist", default=None))`` for an adapter
    line (``default``: what to return before the line's first promotion; without it, a ConfigError)."""
    pointer = Path(line) / POINTER
    if not pointer.is_file():
        if default is not _NO_DEFAULT:
            # Said each time: a relative line is read from the working directory, and a job run from another
            # one (cron, systemd) would otherwise run the default silently while a version is promoted.
            log.warning(
                "promoted(%r): nothing promoted in %s%s; using the default, %r",
                str(line),
                Path(line).resolve(),
                "" if Path(line).is_absolute() else f" (read from the working directory, {Path.cwd()})",
                default,
            )
            return default
        raise ConfigError(
            "Model.name",
            f"{line} has no promoted version ({POINTER} missing): `slmbatch promote {line} VERSION` first",
        )
    version = json.loads(pointer.read_text())["version"]
    return str(Path(line).resolve() / version)


def in_line(path: str) -> Path | None:
    """The model line ``path`` is a version of (its parent holds a pointer), or None."""
    parent = Path(os.path.expanduser(path)).resolve().parent
    return parent if (parent / POINTER).is_file() else None


def lineage(line: str | os.PathLike) -> set[str]:
    """Every model ``line`` ever served (real paths): its versions and what its first promotion replaced."""
    now = current(line) or {}
    out = {os.path.realpath(Path(line) / v) for v in versions(line)}
    out |= {os.path.realpath(h["replaces"]) for h in now.get("history", []) if h.get("replaces")}
    return out


def versions(line: str | os.PathLike) -> list[str]:
    """The line's versions, oldest first (``v1``, ``v2``, ...)."""
    root = Path(line)
    found = [p.name for p in root.glob("v*") if p.is_dir() and p.name[1:].isdigit() and (p / CARD).is_file()]
    return sorted(found, key=lambda v: int(v[1:]))


def current(line: str | os.PathLike) -> dict[str, Any] | None:
    pointer = Path(line) / POINTER
    return json.loads(pointer.read_text()) if pointer.is_file() else None


def read_card(version_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(version_dir) / CARD
    if not path.is_file():
        raise InputError(f"{version_dir} is not a model version slmbatch trained (no {CARD})")
    return json.loads(path.read_text())
