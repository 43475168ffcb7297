"""Reading a data file for the sink, streaming: JSONL line by line, a JSON array item by item
(an incremental parser), every byte hashed as it goes past so the dataset sha256 costs no second read."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from kftune.core.errors import KftuneError
from kftune.core.storage import resolve_path
from kftune.data.formats import from_json
from kftune.data.rules import Note, Row

BOM = b"\xef\xbb\xbf"


class BrokenFile(Exception):
    """The rest of the file can't be read (a JSON array that breaks off)."""

    def __init__(self, line: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.line, self.rule, self.message = line, rule, message


class HashingReader(io.RawIOBase):
    """A raw file that feeds every byte read to sha256 and counts them (for the progress bar)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        self.sha256.update(memoryview(buffer)[:n])
        self.bytes_read += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def jsonl_rows(stream: Iterable[bytes], first_line: int = 1) -> Iterator[Row | Note]:
    """Rows of a JSONL file; a line that can't be decoded or parsed becomes a rejected row."""
    for number, raw in enumerate(stream, start=first_line):
        if raw[:1] != b"{":  # nearly every line opens an object: no BOM, not blank
            if raw.startswith(BOM):
                raw = raw[len(BOM) :]
                yield Note(number, "parse.bom", "a UTF-8 byte-order mark starts the line; it was removed")
            if not raw.strip():
                yield Note(number, "parse.blank_line", "blank line skipped; remove it")
                continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Row(
                number,
                None,
                raw.decode("utf-8", "replace").rstrip("\r\n"),
                problems=[
                    (
                        "parse.invalid_utf8",
                        f"byte {exc.start + 1} (0x{raw[exc.start]:02x}) is not valid UTF-8; re-save the file as UTF-8",
                    )
                ],
            )
            continue
        try:
            yield Row(number, None, from_json(text))
        except json.JSONDecodeError as exc:
            yield Row(
                number,
                None,
                text.rstrip("\r\n"),
                problems=[
                    ("parse.invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}; fix or remove the line")
                ],
            )


_NOT_SPACE = re.compile(r"[^ \t\r\n]")
_NUMBER_ENDS = (" ", "\t", "\r", "\n", ",", "]")


class ArrayItems:
    """Items of a JSON array file, decoded one at a time with `raw_decode` (bounded memory).

    The buffer holds at most about one item plus a 1 MiB read-ahead. A syntax error ends the
    array: there is no reliable way to find the next item after it, so it raises BrokenFile.
    """

    def __init__(self, stream: IO[str], chunk_chars: int = 1 << 20) -> None:
        self._stream, self._chunk = stream, chunk_chars
        self._decoder = json.JSONDecoder()
        self._buf, self._pos, self._line, self._eof = "", 0, 1, False

    def _advance(self, to: int) -> None:
        self._line += self._buf.count("\n", self._pos, to)
        self._pos = to

    def _fill(self) -> None:
        """Drop what was consumed and read on, at least doubling what is buffered (amortised re-parses)."""
        try:
            new = self._stream.read(max(self._chunk, len(self._buf) - self._pos))
        except UnicodeDecodeError as exc:
            raise BrokenFile(
                self._line, "parse.invalid_utf8", f"not valid UTF-8 near here ({exc.reason}); re-save the file as UTF-8"
            ) from None
        self._buf, self._pos, self._eof = self._buf[self._pos :] + new, 0, not new

    def _peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            found = _NOT_SPACE.search(self._buf, self._pos)
            if found:
                self._advance(found.start())
                return self._buf[self._pos]
            self._advance(len(self._buf))
            if self._eof:
                return ""
            self._fill()

    def _value(self) -> tuple[int, Any]:
        self._peek()  # raw_decode does not skip leading whitespace
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                # Text cut at the buffer's end fails in a string or within a few characters of the end;
                # any other error is real, and reading on would only load the rest of the file.
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self._buf) - 16
                if self._eof or not cut:
                    line = self._line + self._buf.count("\n", self._pos, exc.pos)
                    raise BrokenFile(
                        line,
                        "parse.broken_array",
                        f"invalid JSON in the array ({exc.msg}); items after this point "
                        "cannot be read; fix the file or convert it to JSONL",
                    ) from None
            else:
                if self._eof or isinstance(value, (dict, list, str)) or self._buf[end : end + 1] in _NUMBER_ENDS:
                    line = self._line
                    self._advance(end)
                    return line, value
            self._fill()  # a number or literal cut at the buffer's end (6.5e|3) may go on

    def _expect(self, chars: str, what: str) -> str:
        found = self._peek()
        if not found or found not in chars:
            seen = f"found {found!r}" if found else "the file ends"
            raise BrokenFile(
                self._line, "parse.broken_array", f"expected {what}, {seen}; items after this point cannot be read"
            )
        self._advance(self._pos + 1)
        return found

    def __iter__(self) -> Iterator[Row]:
        self._expect("[", "'[' to open the array")
        if self._peek() == "]":
            self._advance(self._pos + 1)
        else:
            index, closer = 0, ","
            while closer == ",":
                line, value = self._value()
                yield Row(line, index, value)
                index += 1
                closer = self._expect(",]", f"',' or ']' after item {index - 1}")
        if self._peek():
            raise BrokenFile(self._line, "parse.broken_array", "data after the closing ']'; remove it")


def sniff(stream: io.BufferedReader, name: str) -> str:
    """jsonl or json-array. A file starting with '[' is a JSON array, unless its first line is a
    complete JSON value and more lines follow (or the file is named .jsonl): then it is JSONL
    whose first row happens to be an array."""
    head = stream.peek(1 << 20).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        return "jsonl"
    first, _, rest = head.partition(b"\n")
    try:
        json.loads(first)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that aren't UTF-8
        return "json-array"
    return "jsonl" if rest.strip() or name.endswith(".jsonl") else "json-array"


def read_rows(stream: io.BufferedReader, data_format: str) -> Iterator[Row | Note]:
    if data_format == "jsonl":
        return jsonl_rows(stream)
    return array_rows(stream)


def array_rows(stream: io.BufferedReader) -> Iterator[Row | Note]:
    if stream.peek(3).startswith(BOM):
        yield Note(1, "parse.bom", "a UTF-8 byte-order mark starts the file; it was removed")
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        yield from ArrayItems(text)
    finally:
        text.detach()  # the byte stream stays open, to hash what follows a broken array


def fetch(source: str) -> Path:
    """A local path for the data: `s3://` artifacts are downloaded (verified, cached) first."""
    if source.startswith("s3://"):
        return Path(resolve_path(source))
    path = Path(source)
    if not path.is_file():
        raise KftuneError(f"{source}: data file not found; pass a JSONL or JSON array file, or an s3:// URI")
    return path


@contextlib.contextmanager
def open_data(path: Path) -> Iterator[tuple[io.BufferedReader, HashingReader, str]]:
    """A data file opened for streaming: (buffered byte stream, hashing reader, format)."""
    reader = HashingReader(io.FileIO(path, "r"))
    with io.BufferedReader(reader, buffer_size=1 << 20) as stream:
        yield stream, reader, sniff(stream, path.name)
