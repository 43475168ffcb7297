"""Feeding rows to the checker: in batches in this process, or in blocks of lines checked by forked
worker processes. The main process reads the blocks and keeps the rules across rows and the writing;
the workers parse and check, a few blocks in flight at a time (bounded memory), and results are taken
in file order, so the output is the same either way."""

from __future__ import annotations

import collections
import io
import os
from collections.abc import Iterator
from typing import Any

from kftune.data.checker import Checker, CleanRow
from kftune.data.formats import from_json
from kftune.data.rules import Note, Options, Row
from kftune.data.sink import Sink
from kftune.data.streaming import BOM, BrokenFile, jsonl_rows

PARALLEL_MIN_BYTES = 8 * 1024 * 1024  # smaller files are checked in-process (forking costs more than it saves)
BLOCK_BYTES = 1 << 19  # lines per worker task, by size (about 3,000 short rows)


def row_batches(sink: Sink, items: Iterator[Row | Note]) -> Iterator[list[Row]]:
    """Rows in batches of `batch_rows`; notes go straight to the gate. A file that breaks off ends
    with its broken item as a rejected row, and the gate fails whatever the counts."""
    batch: list[Row] = []
    try:
        for item in items:
            if isinstance(item, Note):
                sink.note(item)
                continue
            batch.append(item)
            if len(batch) == sink.options.batch_rows:
                yield batch
                batch = []
    except BrokenFile as exc:
        sink.fatal = f"{sink.where(exc.line)}: {exc.message}"
        batch.append(Row(exc.line, None, None, problems=[(exc.rule, exc.message)]))
    if batch:
        yield batch


_worker_checker: Checker | None = None


def _start_worker(checker: Checker) -> None:
    global _worker_checker
    _worker_checker = checker  # inherited through fork, not pickled


def _block_values(lines: list[bytes]) -> list[Any] | None:
    """The JSON value of each line, from one json call; None when a line holds anything but one
    value (a blank line, a BOM, bad JSON or UTF-8: the block is then read line by line)."""
    try:
        values = from_json((b"[" + b",".join(lines) + b"]").decode("utf-8"))
    except ValueError:  # JSONDecodeError or UnicodeDecodeError
        return None
    return values if len(values) == len(lines) else None  # a line like `1, 2` holds two values


def check_block(checker: Checker, first_line: int, lines: list[bytes]) -> list[Row | Note | CleanRow]:
    """Parse and check one block of JSONL lines; the items come back in file order.

    An accepted row keeps its line's bytes instead of the parsed object (cheaper to pickle back
    from a worker); the gate parses it again only if it turns out to be a duplicate."""
    values = _block_values(lines)
    if values is None:
        items: list[Row | Note | CleanRow] = list(jsonl_rows(lines, first_line))
        rows = [item for item in items if isinstance(item, Row)]
        for start in range(0, len(rows), checker.options.batch_rows):
            checker.check(rows[start : start + checker.options.batch_rows])
    else:
        items, rows = [], []
        for line, value, clean, raw in zip(
            range(first_line, first_line + len(lines)), values, checker.fast(values), lines
        ):
            if type(clean) is tuple:
                items.append((line, *clean, raw))
            else:
                rows.append(Row(line, None, value, tokens=clean))
                items.append(rows[-1])
        checker.slow(rows)
    for row in rows:
        if not row.problems:
            row.raw, row.messages = lines[row.line - first_line].removeprefix(BOM), None
    return items


def check_block_in_worker(
    first_line: int, lines: list[bytes]
) -> tuple[list[Row | Note | CleanRow], dict[str, Any] | None]:
    """check_block in a worker process; also returns the worker's token-count stats."""
    checker = _worker_checker
    items = check_block(checker, first_line, lines)
    counter = checker.counter
    return items, ({"pid": os.getpid(), **counter.stats, "slow_reason": counter.slow_reason} if counter else None)


def _rows_of(sink: Sink, items: list[Row | Note | CleanRow]) -> list[Row | CleanRow]:
    """The rows of a block; its notes go straight to the gate."""
    rows = []
    for item in items:
        if isinstance(item, Note):
            sink.note(item)
        else:
            rows.append(item)
    return rows


def serial_blocks(sink: Sink, checker: Checker, stream: io.BufferedReader) -> Iterator[list[Row | CleanRow]]:
    next_line = 1
    while lines := stream.readlines(BLOCK_BYTES):
        yield _rows_of(sink, check_block(checker, next_line, lines))
        next_line += len(lines)


def worker_count(options: Options, size: int) -> int:
    """Worker processes for a JSONL file: options.workers, or by default one per usable CPU (at
    most 4) for files of PARALLEL_MIN_BYTES and more; 1 means check in this process."""
    if options.workers:
        return options.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 4) if size >= PARALLEL_MIN_BYTES else 1


def parallel_batches(
    sink: Sink, checker: Checker, stream: io.BufferedReader, workers: int
) -> Iterator[list[Row | CleanRow]]:
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker, and no fork warning from tokenizers
    stats: dict[int, dict[str, Any]] = {}
    try:
        with ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(checker,)
        ) as pool:
            pending: collections.deque[Future] = collections.deque()
            next_line = 1
            while True:
                while len(pending) <= workers and (lines := stream.readlines(BLOCK_BYTES)):
                    pending.append(pool.submit(check_block_in_worker, next_line, lines))
                    next_line += len(lines)
                if not pending:
                    break
                items, worker_stats = pending.popleft().result()
                if worker_stats:
                    stats[worker_stats.pop("pid")] = worker_stats
                yield _rows_of(sink, items)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    if checker.counter:
        checker.counter.absorb(list(stats.values()))
