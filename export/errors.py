"""Errors a user can cause while exporting; each message is one sentence that says what to do."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot go on; str(err) is the sentence to show."""


class ParityError(ExportError):
    """An exported model that differs from its reference; nothing was kept."""

    def __init__(self, message: str, figures: list[str]):
        super().__init__(message)
        self.figures = figures
