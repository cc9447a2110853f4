"""Rows a run would set aside when one dataset was written by different writers.

A measurement, not a test: it asserts nothing. It writes two directories of
Banking77 texts (``../shared/data`` or ``examples/data``) and plans them with
:func:`slmbatch.io.plan_shards` - the planning every run does - printing the
rows and files set aside:

* ``categorical-first``: one dictionary-encoded file (pandas categoricals)
  that sorts first, then ten plain ``string`` files (the held-out case of
  issue 12, where the first file became the reference);
* ``many-writers``: ``string``, ``large_string``, ``string_view`` and
  binary-without-UTF-8-annotation text; ``int32``, ``int64`` and ``uint16``
  ids; a column that is all-null in one file.

Run from the repository root: ``.venv/bin/python benchmarks/mixed_writers.py``.
``--root DIR`` plans with the slmbatch of another checkout (e.g. a
``git worktree`` of an older commit), for before/after figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mixed_writers.json"


def banking_texts() -> list[str]:
    import polars as pl

    for path in (ROOT.parent / "shared" / "data" / "banking77" / "train.parquet", ROOT / "examples" / "data"):
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path] if path.exists() else []
        if files:
            return pl.concat([pl.read_parquet(f).select("text") for f in files])["text"].to_list()
    raise SystemExit("no Banking77 data found (../shared/data/banking77 or examples/data)")


def write_cases(base: Path, texts: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = base / "categorical-first"
    first.mkdir()
    pq.write_table(pa.table({"text": pa.array(texts[:50]).dictionary_encode()}), first / "000-categorical.parquet")
    for i in range(10):
        pq.write_table(
            pa.table({"text": pa.array(texts[i * 500 : (i + 1) * 500 + 4000])}), first / f"part-{i:03}.parquet"
        )
    many = base / "many-writers"
    many.mkdir()
    n = 3000
    for i, (text_type, id_type) in enumerate(
        [(pa.string(), pa.int32()), (pa.large_string(), pa.int64()), (pa.string_view(), pa.uint16())]
    ):
        note = pa.nulls(n) if i == 0 else pa.array(["x"] * n)
        table = pa.table({"text": pa.array(texts[:n], text_type), "n": pa.array(range(n), id_type), "note": note})
        pq.write_table(table, many / f"writer-{i}.parquet")
    binary = pa.array([t.encode() for t in texts[:n]], pa.binary())
    table = pa.table({"text": binary, "n": pa.array(range(n), pa.int64()), "note": pa.array(["y"] * n)})
    pq.write_table(table, many / "writer-3-binary.parquet")
    return {"categorical-first": first, "many-writers": many}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose slmbatch plans (default: this one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    from slmbatch.io import plan_shards

    texts = banking_texts()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in write_cases(Path(tmp), texts).items():
            extra = {"text_columns": {"text"}} if "text_columns" in plan_shards.__code__.co_varnames else {}
            plan = plan_shards(str(path), None, ["text"], None, **extra)
            total = plan.num_rows + plan.skipped_rows
            results[name] = {
                "files": len(plan.shards) + len(plan.skipped),
                "rows": total,
                "rows_set_aside": plan.skipped_rows,
                "files_set_aside": [[Path(p).name, reason] for p, reason in plan.skipped],
                "schema": str(plan.schema),
            }
            print(f"{name:18} {plan.skipped_rows:>7,} of {total:,} rows set aside ({len(plan.skipped)} files)")
            for p, reason in plan.skipped[:3]:
                print(f"{'':18}   {Path(p).name}: {reason}")
    if args.root.resolve() == ROOT:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "cases": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
