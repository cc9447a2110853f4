"""Where a job reads and writes, as paths: one spelling of each, and whether two overlap.

Decided on the strings alone - local paths and ``s3://`` URLs alike, no storage
access - so a job definition checks them the moment it is built.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath

#: Characters that make a source path a glob (as fsspec reads it).
GLOB_CHARS = set("*?[")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def canonical_path(path: str) -> str:
    """``path`` spelled one way: a local path absolute and normalised (``data/in/``, ``./data//in`` and
    ``/abs/data/in`` are one path), a URL with its key normalised and no trailing ``/``."""
    if is_remote(path):
        protocol, key = path.split("://", 1)
        key = posixpath.normpath("/" + key).lstrip("/")
        return f"{protocol}://{key}"
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def _could_hold(pattern: str, path: str) -> bool:
    """Whether files under directory ``path`` could match the glob ``pattern`` (both canonical): segment
    by segment, as fsspec's glob matches (``*`` within a segment, ``**`` across any number)."""
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    for i, part in enumerate(pattern_parts):
        if part == "**":
            return True
        if i == len(path_parts):
            return True  # the pattern goes on below the directory
        if not fnmatch.fnmatchcase(path_parts[i], part):
            return False
    return False  # the pattern ends above the directory: it matches no file inside it


def overlap(source: str, sink: str) -> str | None:
    """Why a job cannot write ``sink`` while reading ``source`` (paths or URLs), or None.

    Output inside the input would be read back as input by the next run; input inside the output
    would be overwritten by it. Decided on the paths alone (no storage access), so it holds at
    definition time for local paths and S3 alike."""
    source, sink = canonical_path(source), canonical_path(sink)
    if source == sink:
        return "is the source path"
    if any(c in source for c in GLOB_CHARS):
        if _could_hold(source, sink):
            return f"holds files the source glob {source!r} matches: the output would be read back as input"
        root = source
        while any(c in root for c in GLOB_CHARS):
            root = posixpath.dirname(root)
        source = root
    elif sink.startswith(source + "/"):
        return f"is inside the source {source!r}: the output would be read back as input by the next run"
    if source.startswith(sink + "/"):
        return f"contains the source {source!r}: the output would overwrite the input"
    return None
