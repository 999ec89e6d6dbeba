"""Lookups in a table the user supplies (CSV, or JSON: a list of objects or {key: {column: value}}).

A question names one row by its key and one column by its name ("What is the capital of France?" with
a row "France" and a column "capital"); matching is by whole words, case-insensitive, longest name first,
and underscores in column names read as spaces. With one value column, naming the row is enough.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from seekforge.dual_chain.solver import MAX_QUESTION_CHARS, Solution, Solver
from seekforge.errors import DataError

MAX_TABLE_BYTES = 64 * 2**20


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+(?:['.][a-z0-9]+)*", text.lower().replace("_", " "))) + " "


def load_table(path: str | Path) -> tuple[str, dict[str, dict[str, str]]]:
    """(the key column's name, {row key: {column: value}}) of a .csv or .json file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"table {path} does not exist: give a .csv or .json file")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise DataError(f"table {path} is larger than {MAX_TABLE_BYTES >> 20} MiB: give a smaller table")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = ([{"key": k, **v} for k, v in data.items()] if isinstance(data, dict)
                    and all(isinstance(v, dict) for v in data.values()) else data)
        else:
            raise DataError(f"table {path}: use a .csv or .json file, got {suffix or 'no suffix'}")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"table {path} cannot be read: {e}") from e
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and r for r in rows):
        raise DataError(f"table {path} holds no rows: a CSV needs a header and rows, a JSON file a list of "
                        f"objects or {{key: {{column: value}}}}")
    key = next(iter(rows[0]))
    table: dict[str, dict[str, str]] = {}
    for i, row in enumerate(rows):
        name = row.get(key)
        if name is None or not str(name).strip():
            raise DataError(f"table {path}: row {i + 1} has no {key!r} (the first column names the rows)")
        table[str(name).strip()] = {str(c): str(v) for c, v in row.items() if c != key and v is not None}
    return key, table


class TableSolver(Solver):
    name = "table"

    def __init__(self, table: dict[str, dict[str, str]], key: str = "key"):
        self.key = key
        self.rows = {_words(k): (k, v) for k, v in table.items() if _words(k).strip()}
        self.columns = {_words(c): c for row in table.values() for c in row if _words(c).strip()}

    @classmethod
    def from_file(cls, path: str | Path) -> TableSolver:
        key, table = load_table(path)
        return cls(table, key)

    @staticmethod
    def _longest(names, text: str) -> list:
        """The names found in `text` that no longer found name contains."""
        found = [n for n in names if n in text]
        return [n for n in found if not any(n != m and n in m for m in found)]

    def applies(self, question: str) -> Solution | None:
        if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS:
            return None
        text = _words(question)
        rows = self._longest(self.rows, text)
        if len(rows) != 1:
            return None
        name, values = self.rows[rows[0]]
        columns = [c for c in self._longest(self.columns, text) if self.columns[c] in values and c not in rows[0]]
        if not columns and len(values) == 1:
            column = next(iter(values))
        elif len(columns) == 1:
            column = self.columns[columns[0]]
        else:
            return None
        answer = values[column].strip()
        if not answer:
            return None
        return Solution(answer, f"table: {self.key} = {name}, {column} = {answer}", self.name)
