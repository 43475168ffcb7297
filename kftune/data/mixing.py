"""Weighted data mixing: general data drawn into the task's training rows, each source at its share.

`data_mix` is a JSON list of `{"uri": ..., "weight": ...}`: each weight is the share of training rows
that source supplies, and the task data (`data_path`, already split by the gate) supplies the rest, so
the weights sum to less than 1. Every source passes the same validation gate as the task data, with its
own report, and only its accepted rows are drawn. The held-out rows are the task's own: mixing happens
where training reads its rows, after the split.

Rows are interleaved with `datasets.interleave_datasets` (probabilities = the shares, `seed` = the
run's seed) and the `first_exhausted` stopping strategy, with every mixed-in source repeated (a new
seeded shuffle per pass) so that it cannot run out first: the stream then ends when the task data has
been drawn whole, once. `all_exhausted` would instead repeat the task rows until the largest general
corpus ran out, so the run's length would follow the size of a corpus that is meant to be a seasoning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from kftune.core.errors import KftuneError
from kftune.data.formats import Sample

KEY = "data_mix"


@dataclass(frozen=True)
class Source:
    uri: str
    weight: float


def parse(value: str | list | None, key: str = KEY) -> list[Source]:
    """The sources of a `data_mix` value (JSON text or a list); one clear line naming `key` on bad input."""
    if value in (None, "", []):
        return []
    items = value
    if isinstance(value, str):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise KftuneError(
                f'{key}: not JSON ({exc.msg}); give a list like [{{"uri": "general.jsonl", "weight": 0.2}}]'
            ) from None
    if not isinstance(items, list) or not items:
        raise KftuneError(f'{key}: expected a non-empty JSON list of {{"uri": ..., "weight": ...}} objects')
    sources = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) != {"uri", "weight"}:
            raise KftuneError(f'{where}: expected an object with exactly "uri" and "weight", got {json.dumps(item)}')
        uri, weight = item["uri"], item["weight"]
        if not isinstance(uri, str) or not uri.strip():
            raise KftuneError(f"{where}.uri: expected a data file path or s3:// URI, got {json.dumps(uri)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise KftuneError(f"{where}.weight ({uri}): expected a finite number, got {json.dumps(weight)}")
        if not 0 < weight < 1:
            raise KftuneError(f"{where}.weight ({uri}): must be between 0 and 1 (exclusive), got {weight}")
        sources.append(Source(uri, float(weight)))
    total = sum(s.weight for s in sources)
    if total >= 1:
        raise KftuneError(
            f"{key}: the weights sum to {total:g}; they must sum to less than 1 (the task data supplies the rest)"
        )
    return sources


def canonical(value: str | list | None) -> str:
    """`data_mix` as one canonical JSON text ("" for none), as a config stores it."""
    sources = parse(value)
    return json.dumps([{"uri": s.uri, "weight": s.weight} for s in sources]) if sources else ""


def mix(
    task_rows: list[Sample], sources: list[tuple[Source, list[Sample]]], seed: int
) -> tuple[list[Sample], list[int]]:
    """(the mixed rows, rows drawn per source with the task data first). Every task row is drawn once. Rows of
    any shape: the draw interleaves (source, index) pairs, so a row's form never passes through Arrow."""
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    if not sources:
        return task_rows, [len(task_rows)]
    task_share = 1 - sum(s.weight for s, _ in sources)
    columns = []
    for index, (source, rows) in enumerate(sources):
        expected = len(task_rows) * source.weight / task_share
        # enough passes that the source cannot run out before the task data (mean + 12 standard deviations)
        need = expected + 12 * math.sqrt(expected / task_share + 1) + 16
        one = Dataset.from_dict({"source": [index + 1] * len(rows), "index": list(range(len(rows)))})
        passes = [one.shuffle(seed=seed + 1000 * index + p) for p in range(math.ceil(need / len(rows)))]
        columns.append(concatenate_datasets(passes))
    task = Dataset.from_dict({"source": [0] * len(task_rows), "index": list(range(len(task_rows)))})
    mixed = interleave_datasets(
        [task, *columns],
        probabilities=[task_share, *(s.weight for s, _ in sources)],
        seed=seed,
        stopping_strategy="first_exhausted",
    )
    drawn = [0] * (len(sources) + 1)
    for index in mixed["source"]:
        drawn[index] += 1
    if drawn[0] != len(task_rows):  # a mixed-in source ran out first: never silently drop task rows
        raise KftuneError(f"{KEY}: the task data was not drawn whole ({drawn[0]} of {len(task_rows)} rows)")
    every = [task_rows, *(rows for _, rows in sources)]
    return [every[s][i] for s, i in zip(mixed["source"], mixed["index"], strict=True)], drawn
