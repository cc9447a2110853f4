"""slmbatch: run small language models over large Parquet tables on Ray + vLLM.

A job is plain Python::

    job = Job(name=..., source=ParquetSource(...), stages=[Classify(...), ...], sink=ParquetSink(...))

and runs with ``slmbatch run job.py`` (or :func:`run`).
"""

from .errors import ConfigError, EngineError, FrontierError, InputError, RowAccountingError, SlmbatchError
from .frontier import Frontier
from .job import Job, Model, ParquetSink, ParquetSource
from .routing import Egress, load_thresholds
from .runner import RunSummary, run
from .stages import Classify, Extract, Stage, Summarize

__all__ = [
    "Classify",
    "ConfigError",
    "Egress",
    "EngineError",
    "Extract",
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
    "run",
]
__version__ = "0.1.0"
