"""Job definitions are validated when they are built, with errors naming the field."""

from __future__ import annotations

import pydantic
import pytest

import slmbatch
from slmbatch import Classify, ConfigError, Extract, Job, Model, ParquetSink, ParquetSource, Summarize

M = Model("some/model")


def make_job(*stages, columns=("text", "label")):
    return Job(
        name="t",
        source=ParquetSource("in/", columns=list(columns) if columns else None),
        stages=list(stages),
        sink=ParquetSink("out/"),
    )


def test_public_api_all_is_sorted_and_complete():
    assert slmbatch.__all__ == sorted(slmbatch.__all__)
    for name in slmbatch.__all__:
        assert hasattr(slmbatch, name)


def test_unknown_option_names_class_and_option():
    with pytest.raises(ConfigError) as err:
        Classify("intent", model=M, input="text", labels=["a", "b"], treshold=0.5)
    assert err.value.field == "Classify.treshold"
    assert "known options" in str(err.value)
    with pytest.raises(ConfigError, match=r"Model\.replica"):
        Model("m", replica=2)


def test_duplicate_label_is_rejected_with_the_value():
    with pytest.raises(ConfigError) as err:
        Classify("intent", model=M, input="text", labels=["a", "b", "a"])
    assert err.value.field == "Classify.labels"
    assert "'a'" in str(err.value)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "high", True])
def test_threshold_outside_unit_interval_is_rejected(threshold):
    with pytest.raises(ConfigError, match=r"Classify\.threshold"):
        Classify("intent", model=M, input="text", labels=["a", "b"], threshold=threshold)


def test_missing_input_column_names_stage_and_column():
    with pytest.raises(ConfigError) as err:
        make_job(Summarize("s", model=M, input="body"))
    assert err.value.field == "Job.stages[0]"
    assert "'body'" in str(err.value)


def test_stage_may_read_an_earlier_stage_output_but_not_a_later_one():
    intent = Classify("intent", model=M, input="text", labels=["complaint", "other"])
    summary = Summarize(
        "summary", model=M, input="text", when={"intent": "complaint"}, prompt="Intent {intent}: {input}"
    )
    job = make_job(intent, summary)
    assert [s.name for s in job.stages] == ["intent", "summary"]
    with pytest.raises(ConfigError, match="'intent'"):
        make_job(summary, intent)


def test_unknown_prompt_placeholder_is_rejected():
    with pytest.raises(ConfigError, match="'customer'"):
        make_job(Summarize("s", model=M, input="text", prompt="{customer} said {input}"))
    with pytest.raises(ConfigError, match=r"Summarize\.prompt"):
        Summarize("s", model=M, input="text", prompt="positional {} placeholder")
    # a format would meet a null, or text where it wants a number, in some row: the run would crash there
    with pytest.raises(ConfigError, match=r"Summarize\.prompt: placeholder \{n:03d\} has a format.*write \{n\}"):
        Summarize("s", model=M, input="text", prompt="n={n:03d}: {input}")
    with pytest.raises(ConfigError, match=r"placeholder \{input!r\} has a format"):
        Classify("c", model=M, input="text", labels=["a", "b"], prompt="{input!r}")
    # a prompt without the row's input would ask every row the same question
    with pytest.raises(ConfigError, match=r"Classify\.prompt: never shows the model the row's input"):
        Classify("c", model=M, input="text", labels=["a", "b"], prompt="Is this message spam?")
    Classify("c", model=M, input="text", labels=["a", "b"], prompt="Is this spam? {text}")  # the column by name


def test_output_column_may_not_overwrite_an_input_column():
    with pytest.raises(ConfigError, match="overwrite"):
        make_job(Classify("label", model=M, input="text", labels=["a", "b"]))


def test_duplicate_stage_names_are_rejected():
    with pytest.raises(ConfigError, match="duplicate stage name"):
        make_job(Summarize("s", model=M, input="text"), Summarize("s", model=M, input="text"))


def test_a_stage_whose_columns_collide_with_another_stages_is_rejected_naming_it():
    """A stage named ``spam_error`` next to ``Classify("spam")`` (whose error column that is), in either order."""
    spam = Classify("spam", model=M, input="text", labels=["a", "b"])
    clash = Classify("spam_error", model=M, input="text", labels=["a", "b"])
    for stages, index in (((spam, clash), 1), ((clash, spam), 1)):
        with pytest.raises(ConfigError) as caught:
            make_job(*stages)
        assert caught.value.field == f"Job.stages[{index}].name"
        assert "'spam_error'" in str(caught.value) and "rename one of the stages" in str(caught.value)


def test_model_values_are_checked():
    with pytest.raises(ConfigError, match=r"Model\.replicas"):
        Model("m", replicas=0)
    with pytest.raises(ConfigError, match=r"Model\.engine\.seed"):
        Model("m", engine={"seed": 3})
    with pytest.raises(ConfigError, match=r"Model\.name"):
        Model("")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"Model\.threads"):
            Model("m", threads=bad)
    assert Model("m").threads is None and Model("m", threads=2).threads == 2


def test_extract_accepts_pydantic_and_types_its_columns():
    class Booking(pydantic.BaseModel):
        people: int
        name: str | None = None
        tags: list[str] = []

    stage = Extract("booking", model=M, input="text", schema=Booking)
    struct = stage.answer_type()
    assert {f.name: str(f.type) for f in struct} == {"people": "int64", "name": "string", "tags": "list<item: string>"}


def test_extract_rejects_untyped_and_non_object_schemas():
    with pytest.raises(ConfigError, match=r"Extract\.schema\.x"):
        Extract("e", model=M, input="text", schema={"type": "object", "properties": {"x": {}}})
    with pytest.raises(ConfigError, match=r"Extract\.schema"):
        Extract("e", model=M, input="text", schema={"type": "string"})
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        Extract("e", model=M, input="text", schema={"type": "object", "properties": {"x": {"type": 5}}})


class _Node(pydantic.BaseModel):  # module level: pydantic resolves the self-reference here
    name: str
    children: list[_Node] = []


def test_extract_schemas_that_cannot_be_a_column_are_refused_naming_why():
    def extract(schema):
        return Extract("e", model=M, input="text", schema=schema)

    with pytest.raises(ConfigError, match=r"Extract\.schema: \$ref '#/\$defs/Nope' names no definition"):
        extract({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}})
    with pytest.raises(ConfigError, match=r"Extract\.schema\.a: may be any of \['string', 'null', 'integer'\]"):
        extract({"type": "object", "properties": {"a": {"type": ["string", "null", "integer"]}}})
    with pytest.raises(ConfigError, match=r"Extract\.schema: must be plain JSON"):
        extract({"type": "object", "properties": {"a": {"type": "string", "enum": {"x"}}}})
    with pytest.raises(ConfigError, match=r"Extract\.schema: is recursive"):
        extract(_Node)
    # a top-level $ref to a definition that is not recursive is followed
    defined = {"$defs": {"B": {"type": "object", "properties": {"n": {"type": "integer"}}}}, "$ref": "#/$defs/B"}
    assert str(extract(defined).answer_type()) == "struct<n: int64>"


def test_summarize_budgets_and_overflow_are_checked():
    with pytest.raises(ConfigError, match=r"Summarize\.max_input_tokens"):
        Summarize("s", model=M, input="text", max_input_tokens=0)
    with pytest.raises(ConfigError, match=r"Summarize\.overflow"):
        Summarize("s", model=M, input="text", overflow="cut")


def test_classifier_labels_are_checked_against_a_local_model(tiny_classifier):
    with pytest.raises(ConfigError, match="'maybe'"):
        Classify("spam", model=Model(tiny_classifier), input="text", labels=["ham", "maybe"])
    Classify("spam", model=Model(tiny_classifier), input="text", labels=["spam", "ham"])


def test_job_prints_without_ray_or_vllm():
    import sys

    job = make_job(Classify("intent", model=M, input="text", labels=["a", "b"], threshold=0.7))
    text = str(job)
    assert "classify 'intent'" in text and "threshold=0.7" in text and "some/model" in text
    import subprocess

    # Defining a job imports neither the engine nor Ray.
    probe = "import sys, slmbatch; slmbatch.Model('m'); print('vllm' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_consecutive_stages_on_one_model_share_a_replica_pool():
    other = Model("other/model")
    job = make_job(
        Classify("a", model=M, input="text", labels=["x", "y"]),
        Summarize("b", model=M, input="text"),
        Summarize("c", model=other, input="text"),
    )
    assert [(m.name, [s.name for s in stages]) for m, stages in job.model_groups()] == [
        ("some/model", ["a", "b"]),
        ("other/model", ["c"]),
    ]


def test_secrets_in_storage_options_are_not_printed():
    job = Job(
        name="t",
        source=ParquetSource(
            "s3://b/in",
            columns=["text"],
            storage_options={"key": "AKIA123", "secret": "shh", "endpoint_url": "http://127.0.0.1:1"},
        ),
        stages=[Summarize("s", model=M, input="text")],
        sink=ParquetSink("s3://b/out"),
    )
    text = str(job)
    assert "AKIA123" not in text and "shh" not in text and "127.0.0.1" in text


@pytest.mark.parametrize(
    ("source", "sink", "why"),
    [
        ("data/in", "data/in/", "is the source path"),
        ("data/in", "./data//in/out", "inside the source"),
        ("data/in/part.parquet", "data/in", "contains the source"),
        ("data/in", "data", "contains the source"),
        ("data/**/*.parquet", "data/out", "source glob"),
        ("data/2026-*/*.parquet", "data/2026-out", "source glob"),
        ("data/2026-*", "data/2026-out", None),  # the glob matches that directory, not the files in it
        ("s3://bucket/raw/", "s3://bucket/raw/enriched", "inside the source"),
        ("s3://bucket/raw/a.parquet", "s3://bucket/raw", "contains the source"),
        ("data/in", "data/in-enriched", None),
        ("data/*.parquet", "data/out", None),
        ("data/2026-*", "data/out", None),
        ("s3://bucket/raw/", "s3://bucket/raw-enriched/", None),
        ("s3://bucket/raw/", "data/raw", None),
    ],
)
def test_the_output_may_not_overlap_the_input(source, sink, why):
    def job():
        return Job(
            name="t",
            source=ParquetSource(source),
            stages=[Classify("label", model=M, input="text", labels=["a", "b"])],
            sink=ParquetSink(sink),
        )

    if why is None:
        job()
    else:
        with pytest.raises(ConfigError, match=rf"Job\.sink\.path.*{why}"):
            job()


def test_a_stage_may_not_write_the_column_it_reads_even_when_the_source_reads_all_columns():
    with pytest.raises(ConfigError, match=r"Job\.stages\[0\]\.name.*'text'"):
        make_job(Classify("text", model=M, input="text", labels=["a", "b"]), columns=None)
    make_job(  # a later stage may read an earlier one's answer, and nothing is overwritten
        Classify("kind", model=M, input="text", labels=["a", "b"]),
        Summarize("gist", model=M, input="text", when={"kind": "a"}),
        columns=None,
    )


def test_a_when_value_that_is_not_a_label_of_that_stage_is_refused():
    with pytest.raises(ConfigError, match=r"Job\.stages\[1\]\.when\.kind.*'eggs' is not a label"):
        make_job(
            Classify("kind", model=M, input="text", labels=["card", "money"]),
            Summarize("gist", model=M, input="text", when={"kind": ["card", "eggs"]}),
        )


def test_a_sink_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"ParquetSink\.path.*is a file"):
        ParquetSink(str(tmp_path / "afile"))


def test_run_dates_from_python_are_dates_datetimes_or_iso_strings_else_a_config_error():
    import datetime as dt

    from slmbatch.runner import parse_date

    assert parse_date(dt.datetime(2026, 12, 1, 10, 0)) == parse_date("2026-12-01") == dt.date(2026, 12, 1)
    job = make_job(Classify("c", model=M, input="text", labels=["a", "b"]))
    for bad in [("2026-12-01",), "2026-12-01:2026-12-02", ("2026-12-01", "2026-13-01")]:
        with pytest.raises(ConfigError, match=r"backfill \(--backfill\)"):
            slmbatch.run(job, backfill=bad)
    for bad in ["", "2026-12-32", 20261201]:
        with pytest.raises(ConfigError, match=r"run_date \(--run-date\): must be a date YYYY-MM-DD"):
            slmbatch.run(job, run_date=bad)


def test_a_thresholds_file_of_another_shape_is_a_config_error_naming_it(tmp_path):
    import json

    def load(data):
        path = tmp_path / "t.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return slmbatch.load_thresholds(str(path))

    assert load({"spam": 0.5}) == {"spam": 0.5} == load({"thresholds": {"spam": 0.5}})
    assert load({"stages": {"spam": {}}, "spam": 0.5}) == {"spam": 0.5}
    with pytest.raises(ConfigError, match="must be a JSON object of stage -> threshold, got a list"):
        load([0.5])
    with pytest.raises(ConfigError, match="is not JSON"):
        load("{spam: 0.5")
    with pytest.raises(ConfigError, match=r"spam: must be a number in \[0, 1\], got nan"):
        load('{"spam": NaN}')


def test_a_bad_job_name_is_quoted_as_written_and_a_sink_under_a_file_is_refused(tmp_path):
    def job(name="t", sink="out"):
        return Job(
            name=name,
            source=ParquetSource("in"),
            stages=[Classify("label", model=M, input="text", labels=["a", "b"])],
            sink=ParquetSink(sink),
        )

    assert job("nightly-intents").name == "nightly-intents"
    with pytest.raises(ConfigError, match=r"Job\.name: .*got 'my-job v2'"):
        job("my-job v2")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"ParquetSink\.path: .* is under '.*a-file', a file"):
        job(sink=str(tmp_path / "a-file" / "out" / "deeper"))
