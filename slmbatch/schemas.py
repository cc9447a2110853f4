"""One read schema for many Parquet files: compatible encodings are one type, the majority decides the rest.

Writers disagree on how to store the same column: pandas categoricals and
many engines dictionary-encode strings, Polars writes ``large_string`` (or
``string_view``), an all-null column is typed ``null``, integer widths follow
the data of each file, timestamps come in four units, and some writers drop
the UTF-8 annotation so text arrives as ``binary``. None of that is a real
conflict, so none of it sets a file aside. :func:`unify_schemas` decides:

* Types are compared by their *logical* type (:func:`logical_type`):
  dictionary-encoded = its values; ``string``/``large_string``/``string_view``
  = ``string``; ``binary`` variants = ``binary``; ``null`` fits anything.
  Types of one *kind* widen to the smallest type that holds every file's
  values exactly: integers (``int32`` + ``int64`` -> ``int64``, ``uint32`` +
  ``int32`` -> ``int64``; ``uint64`` + a signed type has no such type and
  conflicts), floats, decimals (the larger integer part and the larger
  scale), dates (``date32``), timestamps (the finest unit; time zones must
  agree on being set, and differing zones become UTC - the same instants).
* A binary column is text - read as ``string`` - where a stage reads it as
  its input or another file has it as text. Its bytes are not validated at
  read time: a row that is not UTF-8 gets that reason in its stage's error
  column, like invalid bytes in a string column, and the rest of the file is
  processed.
* A column a stage reads as its input is text: a file holding another kind
  there (integers, say) is set aside with that reason, even when every file
  does - its rows could only fail, and a rerun reads it again once fixed.
* What is left is a real conflict (text vs integer, say). The *kind* held by
  the most rows wins (ties: the alphabetically first kind), so the result
  never depends on the order files are listed in and one odd file cannot
  outvote the rest. A file set aside is told the type it had and the type
  expected.
* A source that reads all columns reads every column any file has (by name,
  as Spark's ``mergeSchema`` and DuckDB's ``union_by_name``): a file without
  one of them has nulls there, so no file's column is dropped and no file is
  set aside for lacking a column no stage reads. A source that lists its
  ``columns`` needs each of them in every file.

:func:`conform` then casts each row group read to the one schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc


def logical_type(t: pa.DataType) -> pa.DataType:
    """``t`` without its physical encoding: dictionary values, and one type per string and binary family."""
    if pa.types.is_dictionary(t):
        return logical_type(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    return t


def kind(t: pa.DataType, text: bool = False) -> str:
    """The family a type widens within; ``text`` makes binary a kind of text."""
    t = logical_type(t)
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or (text and pa.types.is_binary(t)):
        return "text"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp"
    return str(t)


_UNITS = ("s", "ms", "us", "ns")


def widen(a: pa.DataType, b: pa.DataType, text: bool = False) -> pa.DataType | None:
    """The smallest type holding every value of ``a`` and of ``b`` exactly, or None (a real conflict)."""
    a, b = logical_type(a), logical_type(b)
    if pa.types.is_null(a):
        a, b = b, a
    if pa.types.is_null(b):  # an all-null column fits any type
        return pa.string() if text and pa.types.is_binary(a) else a
    k = kind(a, text)
    if k != kind(b, text):
        return None
    if k == "text":
        return pa.string()
    if a == b:
        return a
    if k == "integer":
        return _widen_integers(a, b)
    if k == "float":
        return max(a, b, key=lambda t: t.bit_width)
    if k == "decimal":
        return _widen_decimals(a, b)
    if k == "date":
        return pa.date32()
    if k.startswith("timestamp"):
        unit = max(a.unit, b.unit, key=_UNITS.index)
        tz = None if a.tz is None else a.tz if a.tz == b.tz else "UTC"
        return pa.timestamp(unit, tz)
    return None


def _widen_integers(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    signed = [t for t in (a, b) if pa.types.is_signed_integer(t)]
    unsigned = [t for t in (a, b) if pa.types.is_unsigned_integer(t)]
    if not signed or not unsigned:
        return max(a, b, key=lambda t: t.bit_width)
    width = max(signed[0].bit_width, 2 * unsigned[0].bit_width)
    return {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}.get(width)


def _widen_decimals(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The decimal holding both: the larger integer part and the larger scale (38 digits in 128 bits, 76 in 256)."""
    scale = max(a.scale, b.scale)
    precision = max(a.precision - a.scale, b.precision - b.scale) + scale
    if precision <= 38 and not (pa.types.is_decimal256(a) or pa.types.is_decimal256(b)):
        return pa.decimal128(precision, scale)
    return pa.decimal256(precision, scale) if precision <= 76 else None


@dataclasses.dataclass(frozen=True)
class Footer:
    """What :func:`unify_schemas` needs of one readable file."""

    path: str
    schema: pa.Schema
    num_rows: int


@dataclasses.dataclass
class Unified:
    """The read schema, and the files that cannot be read into it (path -> reason)."""

    schema: pa.Schema | None
    conflicts: dict[str, str]


def unify_schemas(
    footers: Sequence[Footer], columns: Sequence[str] | None = None, text_columns: Collection[str] = ()
) -> Unified:
    """One schema for ``footers`` (the source's ``columns``, or every column most rows have)."""
    voters = sorted((f for f in footers if f.num_rows), key=lambda f: (-f.num_rows, f.path))
    if not voters:  # only empty files: none can clash, the first schema will do
        first = min(footers, key=lambda f: f.path, default=None)
        return Unified(first.schema if first else None, {})
    total = sum(f.num_rows for f in voters)
    names = list(columns) if columns is not None else _all_columns(voters)
    conflicts: dict[str, str] = {}
    fields = []
    for name in names:
        holders = [f for f in voters if name in f.schema.names]
        for f in voters:
            if name not in f.schema.names and columns is not None:
                conflicts.setdefault(
                    f.path, f"no column {name!r}, which files holding {_share(holders, total)} rows have"
                )
        text = name in text_columns or any(kind(f.schema.field(name).type) == "text" for f in holders)
        target, odd = _column_type(name, holders, text, must_be_text=name in text_columns)
        if target is None:
            continue
        fields.append(pa.field(name, target))
        for path, reason in odd.items():
            conflicts.setdefault(path, reason)
    return Unified(pa.schema(fields), conflicts)


def _all_columns(voters: Sequence[Footer]) -> list[str]:
    """Every column any file has, in the largest file's order, then each other file's new ones."""
    return list(dict.fromkeys(n for f in voters for n in f.schema.names))


def _column_type(
    name: str, holders: Sequence[Footer], text: bool, must_be_text: bool = False
) -> tuple[pa.DataType | None, dict[str, str]]:
    """The column's type, widened over the majority kind; the files that do not fit, with why.
    ``must_be_text`` (a stage's input): text, whatever most rows have - a file holding numbers
    there is set aside, not read into rows that could only fail."""
    if not holders:
        return None, {}
    if must_be_text:
        odd = {
            f.path: f"column {name!r} is {f.schema.field(name).type}, not text: a stage reads it as its input"
            for f in holders
            if kind(f.schema.field(name).type, text=True) not in ("text", "null")
        }
        if odd:
            rest = [f for f in holders if f.path not in odd]
            fit = _column_type(name, rest, text)[0] if rest else None
            return (pa.string() if fit is None or pa.types.is_null(fit) else fit), odd
    by_kind: dict[str, int] = {}
    for f in holders:
        k = kind(f.schema.field(name).type, text)
        by_kind[k] = by_kind.get(k, 0) + f.num_rows
    real = {k: n for k, n in by_kind.items() if k != "null"} or by_kind
    winner = min(real, key=lambda k: (-real[k], k))
    target: pa.DataType = pa.null()
    for f in holders:  # most rows first: a file that cannot widen the type so far is the odd one
        if kind(f.schema.field(name).type, text) in (winner, "null"):
            target = widen(target, f.schema.field(name).type, text) or target
    fits = {f.path: widen(target, f.schema.field(name).type, text) == target for f in holders}
    held = _share([f for f in holders if fits[f.path]], sum(f.num_rows for f in holders))
    odd = {
        f.path: f"column {name!r} is {f.schema.field(name).type}, expected {target} (the type of files holding {held} rows)"
        for f in holders
        if not fits[f.path]
    }
    return target, odd


def _share(files: Iterable[Footer], total: int) -> str:
    rows = sum(f.num_rows for f in files)
    return f"{rows:,} of {total:,}" if total else "0"


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns of ``schema``, cast to it (see the module docstring).

    Binary read as text is reinterpreted without validating UTF-8, so that
    one bad row does not fail its row group: the stage reading it gives that
    row the reason.
    """
    arrays = []
    for field in schema:
        if field.name not in table.column_names:  # a column other files have: nulls here
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type != field.type:
            if pa.types.is_dictionary(column.type):
                column = pc.cast(column, column.type.value_type)
            unchecked = pa.types.is_string(field.type) and kind(column.type) == "binary"
            options = pc.CastOptions(target_type=field.type, allow_invalid_utf8=unchecked)
            column = pc.cast(column, options=options)
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=schema)


def replace_invalid_utf8(table: pa.Table) -> pa.Table:
    """``table`` with each text cell whose bytes are not UTF-8 decoded with U+FFFD in their place.

    Binary input read as text (:func:`conform`) keeps its bytes as they were until it is written;
    a text column holding invalid UTF-8 would make an output file that readers refuse, and writing
    such a column as binary made the sink's files disagree on its type (no reader takes them as one
    table). So every output file types it as text; the row carries the reason in its stage's error
    column, and its input file keeps the original bytes. Every other column is left as it is.
    """
    for i, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        try:
            table.column(i).validate(full=True)
        except pa.ArrowInvalid:
            raw = table.column(i).cast(pa.large_binary() if pa.types.is_large_string(field.type) else pa.binary())
            text = [None if b is None else b.decode("utf-8", "replace") for b in raw.to_pylist()]
            table = table.set_column(i, field, pa.array(text, field.type))
    return table
