"""Stage families. Each lives in its own module and implements the contract in :mod:`.base`."""

from .base import Stage
from .classify import Classify
from .extract import Extract
from .summarize import Summarize

__all__ = ["Classify", "Extract", "Stage", "Summarize"]
