"""Stage families. Each lives in its own module and implements the contract in :mod:`.base`."""

from .base import FAMILIES, Stage, family
from .classify import Classify
from .extract import Extract
from .summarize import Summarize

__all__ = ["FAMILIES", "Classify", "Extract", "Stage", "Summarize", "family"]
