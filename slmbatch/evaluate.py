"""Quality against labels: the small model, the frontier and the cascade, per stage.

Everything is computed from the routing row format a run writes (see
:mod:`slmbatch.columns`): ``<s>_small`` is the small model's answer,
``<s>_frontier`` the frontier's (escalated rows), ``<s>`` the cascade's, and
``<s>_confidence`` what the threshold compares. Calibration
(:mod:`slmbatch.calibrate`) learns from exactly these rows.

Metrics, one headline metric per family (a mean over rows, so a cascade's
quality is the mean of its rows' scores):

- classify: **accuracy** (headline) and macro-F1 over the labels that occur
  in the gold or the answers (as scikit-learn's ``f1_score(average="macro")``;
  a label with no support and no prediction is not counted, an undefined F1 is 0);
- extract: **exact match** (headline: every field equal) and field-level
  precision / recall / F1, micro-averaged over fields. Strings compare
  case-insensitively after trimming, numbers by value, a missing field as null;
- summarize: **ROUGE-L** F-measure (headline), Google's ``rouge-score``
  implementation with Porter stemming.

A row with no answer scores 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from .columns import FRONTIER
from .errors import ConfigError, InputError
from .job import Job
from .stages import family

# -- reading a run's output with its gold -----------------------------------------------


def read_output(job: Job, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """Every row the job's sink holds (all ``*.parquet`` outside ``_slmbatch``)."""
    import pyarrow.parquet as pq

    from .io import list_parquet

    fs, _, files = list_parquet(job.sink.path, job.sink.storage_options)
    tables = [pq.read_table(f, filesystem=fs, columns=list(columns) if columns else None) for f in files]
    return one_frame(tables, job.sink.path)


def one_frame(tables: Sequence[Any], where: str) -> pl.DataFrame:
    """Output files of several runs as one frame: a column's type widened where runs differ (an input
    id that was int32 one night and int64 the next); an InputError naming it where no type holds both."""
    import pyarrow as pa

    try:
        return pl.DataFrame(pa.concat_tables(tables, promote_options="permissive"))
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise InputError(f"the output files in {where} cannot be read as one table: {exc}") from None


WEIGHT_PREFIX = "_weight_"


def read_production(job: Job, sinks: Sequence[str], since: str | None = None) -> pl.DataFrame:
    """The rows past runs of ``job`` wrote to ``sinks`` (run dates ``since`` on, if given) that carry
    a frontier answer - escalated or audited - with each routed stage's inverse-probability weight
    in ``_weight_<stage>`` (:func:`slmbatch.audit.row_weights`): what ``calibrate --from-runs`` learns from.
    Several sinks: e.g. one output directory per night."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .audit import row_weights
    from .io import filesystem
    from .ledger import Ledger

    outputs = sorted(
        {
            r["output"]
            for sink in sinks
            for r in Ledger.open(sink, job.sink.storage_options).completed().values()
            if since is None or (r.get("run_date") or "") >= since
        }
    )
    named = ", ".join(sinks)
    if not outputs:
        raise InputError(f"no run of {named} {'since ' + since + ' ' if since else ''}wrote output to learn from")
    routed = [s for s in job.stages if s.routed]
    tables = []
    for url in outputs:
        fs, path = filesystem(url, job.sink.storage_options)
        table = pq.read_table(path, filesystem=fs)
        for stage in routed:
            if stage.columns.routed_to in table.column_names:
                weights = row_weights(table, stage.columns)
                table = table.append_column(WEIGHT_PREFIX + stage.name, pa.array(weights, pa.float64()))
        tables.append(table)
    frame = one_frame(tables, named)
    weight_columns = [c for c in frame.columns if c.startswith(WEIGHT_PREFIX)]
    if not weight_columns:
        raise InputError(f"{named} holds no output of a routed stage of job {job.name!r}")
    return frame.filter(pl.any_horizontal([pl.col(c).is_not_null() for c in weight_columns]))


def read_labels(path: str, field: str = "--labels") -> pl.DataFrame:
    """A labels file: Parquet (file or directory), CSV, or JSON lines (a ConfigError naming ``field``, the
    option that named it, if it cannot be read)."""
    import pyarrow as pa

    lower = path.lower()
    try:
        if lower.endswith(".csv"):
            return pl.read_csv(path)
        if lower.endswith((".jsonl", ".ndjson", ".json")):
            return pl.read_ndjson(path)
        import pyarrow.parquet as pq

        return pl.DataFrame(pq.read_table(path))
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as exc:
        raise ConfigError(field, f"cannot read labels file {path!r}: {type(exc).__name__}: {exc}") from exc


def parse_gold(specs: Sequence[str]) -> dict[str, str]:
    """``["intent=label", ...]`` -> ``{"intent": "label"}`` (the --gold option)."""
    out = {}
    for item in specs:
        stage, sep, column = item.partition("=")
        if not sep or not stage or not column:
            raise ConfigError("--gold", f"must be STAGE=COLUMN, got {item!r}")
        out[stage] = column
    return out


GOLD_PREFIX = "_gold_"


def with_gold(
    job: Job,
    output: pl.DataFrame,
    labels: pl.DataFrame | None,
    key: str | None,
    gold: Mapping[str, str],
    stages: Sequence[str] | None = None,
) -> tuple[pl.DataFrame, dict[str, str]]:
    """The output with a ``_gold_<stage>`` column per stage that has labels.

    A stage's gold is the column ``gold[stage]`` (default: a column named as
    the stage) of the labels file, joined on ``key``, or - without a labels
    file - of the output rows themselves (labels carried in the input).
    ``"people,date,time"`` makes an extraction gold record of those columns,
    named as the columns. Returns the frame and ``{stage: where its gold came from}``.
    """
    wanted = [s for s in job.stages if stages is None or s.name in stages]
    for name in gold:
        if name not in {s.name for s in job.stages}:
            raise ConfigError("--gold", f"job {job.name!r} has no stage {name!r}")
    frame, where = (labels, "labels file") if labels is not None else (output, "output")
    found: dict[str, str] = {}
    picked: list[pl.Expr] = []
    for stage in wanted:
        spec = gold.get(stage.name, stage.name if labels is not None else None)
        if spec is None:
            continue
        columns = [c.strip() for c in spec.split(",")]
        missing = [c for c in columns if c not in frame.columns]
        if missing and stage.name not in gold:
            continue  # no column named after the stage: this stage has no gold
        if missing:
            raise ConfigError("--gold", f"column {missing[0]!r} is not in the {where} (columns: {frame.columns})")
        expr = pl.struct(columns) if len(columns) > 1 else pl.col(columns[0])
        picked.append(expr.alias(GOLD_PREFIX + stage.name))
        found[stage.name] = f"{where} column{'s' if len(columns) > 1 else ''} {spec!r}"
    if labels is None:
        return output.with_columns(picked), found
    if key is None:
        raise ConfigError(
            "--key",
            "a labels file needs --key COLUMN: the column that identifies a row "
            "in both the labels file and the job's output (e.g. an id column; "
            "_row_id works for labels keyed by slmbatch's row ids)",
        )
    for name, frame in (("labels file", labels), ("job output", output)):
        if key not in frame.columns:
            raise ConfigError("--key", f"column {key!r} is not in the {name} (columns: {frame.columns})")
    if labels[key].is_duplicated().any():
        raise InputError(f"labels file has duplicate keys in column {key!r}")
    return output.join(labels.select([pl.col(key), *picked]), on=key, how="left"), found


# -- per-stage rows of the cascade ---------------------------------------------------------


@dataclasses.dataclass
class StageRows:
    """One stage's labelled rows in the routing row format, as plain lists."""

    name: str
    kind: str
    gold: list[Any]
    small: list[Any]
    confidence: list[float | None]
    cascade: list[Any]
    frontier: list[Any]  # None where the frontier did not answer
    escalated: list[bool]  # answered by the frontier in this run
    escalatable: list[bool]  # small answered, or failed in a way a bigger model can fix
    small_cost: list[float]
    frontier_cost: list[float]
    routed: bool = True
    weight: list[float] | None = None  # rows each stands for (production rows, inverse-probability); None: 1 each

    def __len__(self) -> int:
        return len(self.gold)


def stage_rows(job: Job, frame: pl.DataFrame, name: str, *, gold_from_frontier: bool = False) -> StageRows:
    """The rows stage ``name`` ran on that have gold (or, with
    ``gold_from_frontier``, a frontier answer used as the gold)."""
    stage = next(s for s in job.stages if s.name == name)
    n = stage.name
    c = stage.columns
    read = [n, c.model, c.error, c.confidence, c.tokens_in, c.tokens_out]
    read += [c.small, c.escalation, c.frontier, c.routed_to] if stage.routed else []
    if missing := [col for col in read if col not in frame.columns]:
        raise InputError(
            f"the output read has no column {missing[0]!r}: it holds no output of stage {n!r} of job "
            f"{job.name!r} as it is now (another job's sink, or a routing the runs did not have?)"
        )
    frame = frame.filter(pl.col(c.model).is_not_null())
    routed = stage.routed
    if gold_from_frontier:
        if not routed:
            raise ConfigError(f"stage {n}", "has no threshold, so no frontier answers to use as gold")
        frame = frame.with_columns(pl.col(c.frontier).alias(GOLD_PREFIX + n))
    frame = frame.filter(pl.col(GOLD_PREFIX + n).is_not_null())
    weighted = WEIGHT_PREFIX + n in frame.columns
    if weighted:
        frame = frame.filter(pl.col(WEIGHT_PREFIX + n).is_not_null())
    empty = [None] * frame.height
    small = frame[c.small].to_list() if routed else frame[n].to_list()
    errors = frame[c.error].to_list()
    escalation = frame[c.escalation].to_list() if routed else empty
    tokens = zip(frame[c.tokens_in].fill_null(0).to_list(), frame[c.tokens_out].fill_null(0).to_list())
    return StageRows(
        name=n,
        kind=stage.kind,
        gold=frame[GOLD_PREFIX + n].to_list(),
        small=small,
        confidence=frame[c.confidence].to_list(),
        cascade=frame[n].to_list(),
        frontier=frame[c.frontier].to_list() if routed else empty,
        escalated=[r == FRONTIER for r in frame[c.routed_to].to_list()] if routed else [False] * frame.height,
        # An errored row with an escalation reason is one the cascade sends up.
        escalatable=[e is None or w is not None for e, w in zip(errors, escalation)],
        small_cost=[stage.model.cost_usd(a, b) for a, b in tokens],
        frontier_cost=frame[c.frontier_cost_usd].fill_null(0.0).to_list() if routed else [0.0] * frame.height,
        routed=routed,
        weight=frame[WEIGHT_PREFIX + n].to_list() if weighted else None,
    )


def evaluate_stage(rows: StageRows, frontier_all: StageRows | None = None) -> dict[str, Any]:
    """The eval table of one stage: each system's metrics, escalation rate and $ per 1k rows."""
    n = len(rows)
    up = [i for i in range(n) if rows.escalated[i]]

    def system(name, predictions, golds, escalated, usd):
        return {
            "system": name,
            "rows": len(golds),
            **family(rows.kind).metrics(predictions, golds),
            "escalation_rate": escalated,
            "usd_per_1k_rows": usd,
        }

    small_usd = sum(rows.small_cost) / n * 1000 if n else math.nan
    frontier_usd = sum(rows.frontier_cost[i] for i in up) / len(up) * 1000 if up else math.nan
    table = [
        system("small model", rows.small, rows.gold, 0.0, small_usd),
        system(
            "cascade",
            rows.cascade,
            rows.gold,
            len(up) / n if n else math.nan,
            (sum(rows.small_cost) + sum(rows.frontier_cost)) / n * 1000 if n else math.nan,
        ),
        system(
            "frontier, escalated rows", [rows.frontier[i] for i in up], [rows.gold[i] for i in up], 1.0, frontier_usd
        ),
        system(
            "small model, escalated rows",
            [rows.small[i] for i in up],
            [rows.gold[i] for i in up],
            0.0,
            sum(rows.small_cost[i] for i in up) / len(up) * 1000 if up else math.nan,
        ),
    ]
    if not rows.routed:
        del table[1:]  # no threshold: the small model is the whole answer
    elif frontier_all is not None:
        m = len(frontier_all)
        table.append(
            system(
                "frontier, all rows",
                frontier_all.frontier,
                frontier_all.gold,
                1.0,
                sum(frontier_all.frontier_cost) / m * 1000 if m else math.nan,
            )
        )
    else:
        table.append(
            {
                "system": "frontier, all rows ($ estimated)",
                "rows": n,
                "escalation_rate": 1.0,
                "usd_per_1k_rows": frontier_usd,
            }
        )
    return {
        "stage": rows.name,
        "kind": rows.kind,
        "metric": family(rows.kind).headline_metric,
        "rows": n,
        "systems": table,
    }


def render_eval(results: Sequence[Mapping[str, Any]], sources: Mapping[str, str]) -> str:
    lines = []
    for result in results:
        metric_names = [
            k for k in result["systems"][0] if k not in ("system", "rows", "escalation_rate", "usd_per_1k_rows")
        ]
        lines.append(
            f"stage {result['stage']} ({result['kind']}): {result['rows']:,} labelled rows, gold from "
            f"{sources.get(result['stage'], '?')}; headline metric {result['metric']}"
        )
        header = (
            f"  {'system':<34} {'rows':>6} "
            + " ".join(f"{m:>15}" for m in metric_names)
            + f" {'escalated':>9} {'$ / 1k rows':>12}"
        )
        lines.append(header)
        for s in result["systems"]:
            cells = " ".join(f"{_fmt(s.get(m)):>15}" for m in metric_names)
            lines.append(
                f"  {s['system']:<34} {s['rows']:>6,} {cells} {_pct(s['escalation_rate']):>9} "
                f"{_fmt(s['usd_per_1k_rows'], 5):>12}"
            )
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def sibling_sink(job: Job, suffix: str) -> str:
    """A sink beside the job's, its path plus ``suffix`` (``s3://b/out/`` -> ``s3://b/out-calibration``)."""
    return job.sink.path.rstrip("/") + suffix


def escalate_all(job: Job, sink: str) -> Job:
    """The job with every routed stage at threshold 1 (every row also gets the
    frontier's answer), writing to ``sink``: how calibration collects both answers.
    ``sink`` may not be the job's sink or inside it, where its rows would be read as the job's."""
    own = job.sink.path.rstrip("/")
    if sink.rstrip("/") == own or sink.startswith(own + "/"):
        raise ConfigError("--sink-all", f"{sink} is inside the job's sink {job.sink.path}: give a path beside it")
    if job.frontier is None:
        raise ConfigError("Job.frontier", "calibration and --frontier-all need a frontier to ask")
    stages = [dataclasses.replace(s, threshold=1.0) if s.routed else s for s in job.stages]
    if not any(s.routed for s in stages):
        raise ConfigError(
            "Job.stages",
            "no stage has a threshold, so none is routed; give the stages to calibrate a threshold (any value)",
        )
    # The egress policy still holds: rows it keeps home have no frontier answer
    # and count as kept on the small model at every threshold.
    return dataclasses.replace(job, stages=stages, sink=dataclasses.replace(job.sink, path=sink))


def with_source(job: Job, source: str | None, sink: str | None) -> Job:
    """The job reading ``source`` and writing ``sink`` instead (either may be None: unchanged)."""
    if source is not None:
        job = dataclasses.replace(job, source=dataclasses.replace(job.source, path=source))
    if sink is not None:
        job = dataclasses.replace(job, sink=dataclasses.replace(job.sink, path=sink))
    return job
