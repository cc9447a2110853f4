"""slmbatch: run small language models over large Parquet tables on Ray + vLLM.

A job is plain Python::

    job = Job(name=..., source=ParquetSource(...), stages=[Classify(...), ...], sink=ParquetSink(...))

and runs with ``slmbatch run job.py`` (or :func:`run`).
"""

from .errors import ConfigError, EngineError, InputError, RowAccountingError, SlmbatchError
from .job import Job, Model, ParquetSink, ParquetSource
from .runner import RunSummary, run
from .stages import Classify, Extract, Stage, Summarize

__all__ = sorted([
    "Classify",
    "ConfigError",
    "EngineError",
    "Extract",
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
    "run",
])
__version__ = "0.1.0"
