"""One read schema for a directory of Parquet files written by different writers (no Ray, real files)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slmbatch import Classify, Model
from slmbatch.errors import RowError
from slmbatch.io import plan_shards, read_row_group
from slmbatch.schemas import conform, widen
from slmbatch.worker import rows_of

TEXTS = [f"message number {i}" for i in range(100)]


def write(path: Path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def read_all(path: str, required=("text",), columns=None, text_columns=("text",)) -> tuple[object, pa.Table]:
    plan = plan_shards(path, None, required, columns, text_columns=text_columns)
    tables = [
        conform(read_row_group(s.path, g, plan.schema.names, None), plan.schema)
        for s in plan.shards
        for g in range(len(s.row_groups))
    ]
    return plan, pa.concat_tables(tables) if tables else None


def test_a_dictionary_encoded_file_listed_first_does_not_split_the_dataset(tmp_path):
    # The held-out case: one categorical-text file sorts first; today it became the reference.
    write(tmp_path / "in" / "000-categorical.parquet", text=pa.array(TEXTS[:5]).dictionary_encode())
    for i in range(20):
        write(tmp_path / "in" / f"part-{i:03}.parquet", text=pa.array(TEXTS))
    plan, table = read_all(str(tmp_path / "in"))
    assert plan.skipped == [] and len(plan.shards) == 21
    assert plan.schema == pa.schema([("text", pa.string())])
    assert table.num_rows == 2005 and table["text"].type == pa.string()


def test_every_string_encoding_integer_width_float_width_and_timestamp_unit_is_one_type(tmp_path):
    d = tmp_path / "in"
    stamp = dt.datetime(2026, 11, 30, 12, 0, 0, 123456)
    write(
        d / "a.parquet",
        text=pa.array(TEXTS[:3], pa.large_string()),
        id=pa.array([1, 2, 3], pa.int32()),
        score=pa.array([0.5, 0.25, 1.0], pa.float32()),
        at=pa.array([stamp] * 3, pa.timestamp("ms")),
        note=pa.nulls(3),
    )
    write(
        d / "b.parquet",
        text=pa.array(TEXTS[3:5], pa.string_view()),
        id=pa.array([2**40, 5], pa.int64()),
        score=pa.array([0.1, 0.2], pa.float64()),
        at=pa.array([stamp] * 2, pa.timestamp("us")),
        note=pa.array(["x", None]).dictionary_encode(),
    )
    write(
        d / "c.parquet",
        text=pa.array(TEXTS[5:7]).dictionary_encode(),
        id=pa.array([7, 8], pa.uint16()),
        score=pa.array([0.3, 0.4], pa.float64()),
        at=pa.array([stamp] * 2, pa.timestamp("ns")),
        note=pa.array(["y", "z"], pa.large_string()),
    )
    plan, table = read_all(str(d))
    assert plan.skipped == []
    assert plan.schema == pa.schema(
        [
            ("text", pa.string()),
            ("id", pa.int64()),
            ("score", pa.float64()),
            ("at", pa.timestamp("ns")),
            ("note", pa.string()),
        ]
    )
    assert table["text"].to_pylist() == TEXTS[:7]
    assert table["id"].to_pylist() == [1, 2, 3, 2**40, 5, 7, 8]
    assert table["note"].to_pylist() == [None, None, None, "x", None, "y", "z"]
    assert table["at"].to_pylist()[3].microsecond == 123456  # a us file keeps its microseconds


def test_the_majority_of_rows_decides_a_real_conflict_whatever_the_listing_order(tmp_path):
    for order, odd_name in (("first", "000-odd.parquet"), ("last", "zzz-odd.parquet")):
        d = tmp_path / order
        write(d / odd_name, text=pa.array([1, 2, 3], pa.int64()))
        for i in range(3):
            write(d / f"part-{i}.parquet", text=pa.array(TEXTS))
        plan, table = read_all(str(d), text_columns=())  # a column no stage reads as its input
        assert [Path(p).name for p, _ in plan.skipped] == [odd_name]
        assert plan.skipped[0][1] == (
            "column 'text' is int64, expected string (the type of files holding 300 of 303 rows)"
        )
        assert plan.schema == pa.schema([("text", pa.string())]) and table.num_rows == 300


def test_a_stage_input_that_is_not_text_sets_its_file_aside_even_when_every_file_has_it(tmp_path):
    """Numbers where a stage reads text: set aside with the reason (a rerun reads the file again once
    fixed), not read into rows that could only fail - whether most rows, or all, have numbers there."""
    write(tmp_path / "all" / "a.parquet", text=pa.array([1, 2, 3], pa.int64()))
    plan, table = read_all(str(tmp_path / "all"))
    assert plan.shards == [] and table is None and plan.skipped_rows == 3
    assert plan.skipped == [
        (str(tmp_path / "all" / "a.parquet"), "column 'text' is int64, not text: a stage reads it as its input")
    ]
    d = tmp_path / "most"
    for i in range(3):
        write(d / f"num-{i}.parquet", text=pa.array(list(range(50)), pa.int32()))
    write(d / "words.parquet", text=pa.array(TEXTS[:4]))
    write(d / "nulls.parquet", text=pa.nulls(2))
    plan, table = read_all(str(d))
    assert sorted(Path(p).name for p, _ in plan.skipped) == ["num-0.parquet", "num-1.parquet", "num-2.parquet"]
    assert {r for _, r in plan.skipped} == {"column 'text' is int32, not text: a stage reads it as its input"}
    assert plan.schema == pa.schema([("text", pa.string())])
    assert table["text"].to_pylist() == [None, None, *TEXTS[:4]]


def test_types_that_cannot_hold_each_other_are_real_conflicts():
    assert widen(pa.int64(), pa.uint64()) is None  # no integer type holds both
    assert widen(pa.timestamp("us"), pa.timestamp("us", "UTC")) is None  # naive vs an instant
    assert widen(pa.int64(), pa.float64()) is None  # floats cannot hold every int64
    assert widen(pa.string(), pa.binary()) is None  # binary is text only where text is expected
    assert widen(pa.string(), pa.binary(), text=True) == pa.string()
    assert widen(pa.timestamp("ms", "Europe/Paris"), pa.timestamp("s", "UTC")) == pa.timestamp("ms", "UTC")
    assert widen(pa.uint32(), pa.int8()) == pa.int64()
    assert widen(pa.date64(), pa.date32()) == pa.date32()
    assert widen(pa.decimal128(10, 2), pa.decimal128(12, 3)) == pa.decimal128(12, 3)
    assert widen(pa.decimal128(38, 0), pa.decimal128(10, 5)) == pa.decimal256(43, 5)


def test_a_binary_text_column_is_text_and_only_rows_that_are_not_utf8_fail(tmp_path):
    d = tmp_path / "in"
    write(d / "a.parquet", text=pa.array(TEXTS[:3]))
    write(d / "b-binary.parquet", text=pa.array([b"fine bytes", b"\xff\xfe not utf-8", None], pa.binary()))
    plan, table = read_all(str(d))
    assert plan.skipped == [] and table["text"].type == pa.string()
    stage = Classify("intent", model=Model("any/model"), input="text", labels=["a", "b"])
    outcomes = []
    for row in rows_of(table):
        try:
            outcomes.append(stage.input_text(row))
        except RowError as exc:
            outcomes.append(f"error: {exc}")
    assert outcomes == [
        *TEXTS[:3],
        "fine bytes",
        "error: input column 'text' is not valid UTF-8",
        "error: input column 'text' is null",
    ]


def test_a_binary_column_only_a_stage_reads_as_text_is_text(tmp_path):
    write(tmp_path / "in" / "a.parquet", text=pa.array([b"hello"], pa.binary()), blob=pa.array([b"\x00"], pa.binary()))
    plan, table = read_all(str(tmp_path / "in"))
    assert plan.schema == pa.schema([("text", pa.string()), ("blob", pa.binary())])
    assert table["text"].to_pylist() == ["hello"]


def test_with_all_columns_every_column_of_any_file_is_kept_and_a_file_without_one_has_nulls(tmp_path):
    d = tmp_path / "in"
    for i in range(3):
        write(d / f"part-{i}.parquet", text=pa.array(TEXTS), lang=pa.array(["en"] * 100))
    write(d / "no-lang.parquet", text=pa.array(TEXTS[:10]))
    write(d / "rare.parquet", text=pa.array(TEXTS[:10]), lang=pa.array(["de"] * 10), rare=pa.array([1] * 10))
    plan, table = read_all(str(d))
    assert plan.schema.names == ["text", "lang", "rare"] and plan.skipped == []
    assert table.num_rows == 320
    by_file = {s.key: s for s in plan.shards}
    assert set(by_file) == {"part-0.parquet", "part-1.parquet", "part-2.parquet", "no-lang.parquet", "rare.parquet"}
    rare = conform(read_row_group(by_file["rare.parquet"].path, 0, plan.schema.names, None), plan.schema)
    assert rare["rare"].to_pylist() == [1] * 10 and rare["lang"].to_pylist() == ["de"] * 10
    no_lang = conform(read_row_group(by_file["no-lang.parquet"].path, 0, plan.schema.names, None), plan.schema)
    assert no_lang["lang"].null_count == 10 and no_lang["rare"].null_count == 10


def test_listed_columns_are_required_in_every_file(tmp_path):
    d = tmp_path / "in"
    write(d / "a.parquet", text=pa.array(TEXTS), lang=pa.array(["en"] * 100))
    write(d / "b.parquet", text=pa.array(TEXTS[:10]))
    plan, _ = read_all(str(d), required=("text", "lang"), columns=["text", "lang"])
    assert plan.schema.names == ["text", "lang"]
    assert [(p.rsplit("/", 1)[-1], r.split(" (")[0]) for p, r in plan.skipped] == [
        ("b.parquet", "missing column 'lang'")
    ]


def test_an_input_column_named_like_a_column_the_job_writes_is_refused_naming_it(tmp_path):
    from slmbatch import Job, ParquetSink, ParquetSource
    from slmbatch.errors import ConfigError
    from slmbatch.plan import plan

    for clash in ("_row_id", "intent_confidence"):
        d = tmp_path / clash
        write(d / "a.parquet", text=pa.array(TEXTS[:3]), **{clash: pa.array(["x"] * 3)})
        job = Job(
            name="j",
            source=ParquetSource(str(d)),
            stages=[Classify("intent", model=Model("any/model"), input="text", labels=["a", "b"])],
            sink=ParquetSink(str(tmp_path / "out")),
        )
        with pytest.raises(ConfigError, match=rf"Job\.source\.columns.*{clash!r}"):
            plan(job)
        listed = Job(  # the same input, reading only what the job needs
            name="j",
            source=ParquetSource(str(d), columns=["text"]),
            stages=[Classify("intent", model=Model("any/model"), input="text", labels=["a", "b"])],
            sink=ParquetSink(str(tmp_path / "out")),
        )
        assert plan(listed).schema.names == ["text"]


@pytest.mark.parametrize("columns", [None, ["text"]])
def test_empty_files_never_vote_and_are_never_set_aside_for_types(tmp_path, columns):
    d = tmp_path / "in"
    write(d / "000-empty.parquet", text=pa.array([], pa.int64()))
    write(d / "a.parquet", text=pa.array(TEXTS[:2]))
    plan, table = read_all(str(d), columns=columns)
    assert plan.skipped == [] and plan.schema == pa.schema([("text", pa.string())]) and table.num_rows == 2


def test_a_directory_source_reads_every_parquet_suffix_in_any_case_and_skips_hidden_names(tmp_path):
    d = tmp_path / "in"
    for name in ("a.parquet", "B.PARQUET", "c.parq", "d.pq", "_SUCCESS.parquet", ".tmp.parquet", "notes.txt"):
        write(d / name, text=pa.array(TEXTS[:2]))
    plan, table = read_all(str(d))
    assert sorted(s.key for s in plan.shards) == ["B.PARQUET", "a.parquet", "c.parq", "d.pq"]
    assert table.num_rows == 8


def test_decimals_of_different_widths_are_one_column_and_keep_every_value(tmp_path):
    from decimal import Decimal

    d = tmp_path / "in"
    write(d / "a.parquet", text=pa.array(TEXTS[:2]), price=pa.array([Decimal("12345678.91")] * 2, pa.decimal128(10, 2)))
    write(d / "b.parquet", text=pa.array(TEXTS[:1]), price=pa.array([Decimal("123456789.123")], pa.decimal128(12, 3)))
    plan, table = read_all(str(d))
    assert plan.skipped == [] and plan.schema.field("price").type == pa.decimal128(12, 3)
    assert sorted(table["price"].to_pylist()) == [Decimal("12345678.910")] * 2 + [Decimal("123456789.123")]
