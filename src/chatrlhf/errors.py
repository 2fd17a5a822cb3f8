"""User-facing errors. Anything raised as a ``UserError`` is printed by the CLI as one line, without a traceback.

Messages name what is wrong and where: the file, the row (1-based) and the field for data; the flag for options.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration the user can fix."""


class DataError(UserError):
    """A dataset row, file or option that cannot be used."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")
        self.file, self.row, self.field = file, row, field


class ModelError(UserError):
    """A model or tokenizer directory that cannot be used (not a model, missing pad/eos, too-long sequences...)."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), cut at ``limit`` characters: for error lines."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
