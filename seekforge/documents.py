"""Documents in text files, one at a time: what pretraining data (seekforge.data.prepare) and tokenizer
training (seekforge.tokenizer.Tokenizer.train) read.

- .txt: the whole file is one document; a line holding only `<|doc|>` separates documents within a file.
- .jsonl: one JSON object per line, with "text" (a string), "messages" (a chat, rendered by the `chat`
  function given), or "prompt" and "completion" (strings: a `Prompted` document). Blank lines are skipped.
- .parquet: the "text" column, one document per row (needs pyarrow).

A document is its text (a `str`, every token a training target) or a `Prompted` one, whose prompt is context
only: pretraining trains its completion alone, as SFT does (a probe task's question, whose filler and first
statement of the answer no model can predict; an instruction).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from seekforge.errors import ConfigError, DataError

DOC_SEPARATOR = "<|doc|>"
EXTENSIONS = (".txt", ".jsonl", ".parquet")


class Prompted(NamedTuple):
    """A document trained on its completion only; its text is prompt + completion."""

    prompt: str
    completion: str


Document = str | Prompted


def text_of(doc: Document) -> str:
    return doc if isinstance(doc, str) else doc.prompt + doc.completion


def document_json(doc: Document) -> dict:
    """The .jsonl object that `iter_documents` reads back as `doc`."""
    return {"text": doc} if isinstance(doc, str) else {"prompt": doc.prompt, "completion": doc.completion}


def iter_documents(path: Path, chat: Callable[[list], str]) -> Iterator[Document]:
    """The non-empty documents of one input file; `chat` renders a jsonl row's "messages"."""
    if not path.exists():
        raise DataError(f"{path} not found: check the --input path")
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass the files inside it (e.g. {path}/*.jsonl)")
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{path} has unsupported extension {path.suffix!r}: use one of "
                        f"{', '.join(EXTENSIONS)} (convert the file first)")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: fill it or leave it out of the inputs")
    reader = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    count = 0
    for doc in reader[path.suffix.lower()](path, chat):
        if text_of(doc).strip():
            count += 1
            yield doc
    if count == 0:
        raise DataError(f"{path} holds no non-empty document: fill it or leave it out of the inputs")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, failing with the byte offset of the first non-UTF-8 byte."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark
            try:
                yield lineno, raw[start:].decode("utf-8")
            except UnicodeDecodeError as err:
                at = offset + start + err.start
                raise DataError(f"{path} is not UTF-8: byte 0x{raw[start + err.start]:02x} at byte offset {at} "
                                f"(line {lineno}) is invalid; re-encode the file as UTF-8 "
                                f"(e.g. iconv -f latin1 -t utf-8)") from None
            offset += len(raw)


def _txt_documents(path: Path, chat) -> Iterator[str]:
    lines = []
    for _, line in _utf8_lines(path):
        if line.strip() == DOC_SEPARATOR:
            yield "".join(lines)
            lines = []
        else:
            lines.append(line)
    yield "".join(lines)


def jsonl_objects(path: Path, example: str = '{"text": "..."}') -> Iterator[tuple[str, dict]]:
    """(where, object) of each non-blank line of a UTF-8 .jsonl file, `where` naming it ("PATH line N") for the
    caller's own errors; a line that is not one JSON object is a DataError (`example`: the object to write)."""
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON ({err.msg} at column {err.colno}): "
                            "fix or remove the line (one JSON object per line)") from None
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {type(row).__name__}, not an object: "
                            f"write one object per line, e.g. {example}")
        yield where, row


def _jsonl_documents(path: Path, chat) -> Iterator[Document]:
    for where, row in jsonl_objects(path):
        if "text" in row:
            if not isinstance(row["text"], str):
                raise DataError(f'{where}: "text" is a {type(row["text"]).__name__}, not a string: '
                                "store the document as a string")
            yield row["text"]
        elif "messages" in row:
            if not isinstance(row["messages"], list):
                raise DataError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
            try:
                yield chat(row["messages"])
            except (ConfigError, AttributeError, KeyError, TypeError) as err:
                raise DataError(f'{where}: cannot render "messages" ({err}): '
                                'give each message a "role" (system/user/assistant) and a string "content"') from None
        elif "completion" in row:
            prompt, completion = row.get("prompt", ""), row["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError(f'{where}: "prompt" and "completion" must be strings')
            yield Prompted(prompt, completion)
        else:
            raise DataError(f'{where} has no "text" field (keys: {", ".join(map(str, row)) or "none"}): '
                            'give each line "text" (a string), "messages" (a chat) or "prompt" and "completion"')


def _parquet_documents(path: Path, chat) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow "
                        "(or convert the file to .jsonl)") from None
    try:
        pfile = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends for corrupt files
        raise DataError(f"{path} is not a readable parquet file ({err}): re-export it") from None
    columns = pfile.schema_arrow.names
    if "text" not in columns:
        raise DataError(f'{path} has no "text" column (columns: {", ".join(columns)}): '
                        'rename the column holding the documents to "text"')
    row = 0
    for batch in pfile.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f'{path} row {row}: "text" is a {type(text).__name__}, not a string: '
                                "store the documents as strings")
            yield text
