"""slmbatch: run small language models over large Parquet tables on Ray + vLLM.

A job is plain Python::

    job = Job(name=..., source=ParquetSource(...), stages=[Classify(...), ...], sink=ParquetSink(...))

and runs with ``slmbatch run job.py`` (or :func:`run`).
"""

from .config import AnswerCache, Egress, Frontier, Model, ParquetSink, ParquetSource, load_thresholds
from .errors import (
    ConfigError,
    EngineError,
    FailureBudgetError,
    FrontierError,
    InputError,
    RowAccountingError,
    SlmbatchError,
)
from .job import Job
from .lines import promoted
from .report import RunSummary
from .runner import run
from .stages import Classify, Extract, Stage, Summarize

__all__ = [
    "AnswerCache",
    "Classify",
    "ConfigError",
    "Egress",
    "EngineError",
    "Extract",
    "FailureBudgetError",
    "Frontier",
    "FrontierError",
    "InputError",
    "Job",
    "Model",
    "ParquetSink",
    "ParquetSource",
    "RowAccountingError",
    "RunSummary",
    "SlmbatchError",
    "Stage",
    "Summarize",
    "load_thresholds",
    "promoted",
    "run",
]
__version__ = "0.1.0"
