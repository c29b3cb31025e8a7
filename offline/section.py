"""The base class of every config section.

Each section lives beside the code it configures; `orchestrator/config.py` assembles them into
one tree. Every field carries constraints and a one-line docstring (the attribute docstring is
picked up by pydantic as the field description), unknown keys are an error, and sections are
frozen so a resolved config cannot drift while a job runs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A frozen, strict config section whose attribute docstrings become field descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
