"""The one exception type for bad input: it names the file, the row and the field."""

from __future__ import annotations


class InputError(Exception):
    """Bad input data or configuration.

    ``row`` is the 1-based line number in the file as a text editor shows it (the CSV header is line 1),
    or a record index / JSON path where the file is not line-oriented.
    """

    def __init__(self, message: str, *, file: object = None, row: object = None, field: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.row is not None:
            where.append(f"line {self.row}" if isinstance(self.row, int) else str(self.row))
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return (": ".join(where) + ": " if where else "") + self.message
