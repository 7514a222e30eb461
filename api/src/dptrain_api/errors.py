"""The one exception tree of the API package."""

from __future__ import annotations

from collections.abc import Sequence


class DptrainApiError(Exception):
    """Root of the API package's errors."""


class ManifestError(DptrainApiError, ValueError):
    """A manifest is malformed or breaks the schema; `problems` names each offending field."""

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        detail = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(f"{message}{detail}")
