"""The base of every recipe section: unknown keys refused, values frozen. No torch here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Refuses unknown keys; values are checked as they are given."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
