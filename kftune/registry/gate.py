"""The promotion gate as one pure function: does a candidate take the `champion` alias?

It sees only numbers (the candidate's, its base's and the current champion's metrics on the same
eval data), so every rule is unit-tested without MLflow, and the registry code that calls it
stays a thin shell that fetches those numbers and writes the decision down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kftune.core.errors import KftuneError

# metric -> True when higher is better; the primary metric must be one of these
DIRECTIONS: dict[str, bool] = {
    "eval_loss": False,
    "perplexity": False,
    "rougeL": True,
    "chrf": True,
    "checks_pass_rate": True,
    "tool_call_name_match": True,  # tool-calling data: the generated call names the reference's function
    "tool_call_args_match": True,  # ... with exactly its arguments
}
DEFAULT_METRIC = "eval_loss"
DEFAULT_MARGIN = 0.01  # the candidate must improve on its base by at least 1% of the base's value


@dataclass(frozen=True)
class Guard:
    """One benchmark metric of the candidate held to its base's value."""

    task: str
    metric: str
    higher_is_better: bool
    base: float | None
    tuned: float | None
    allowed: float | None  # the largest drop allowed, in the metric's units
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]  # one sentence per comparison made, in order; the last says why not, when not
    metric: str
    margin: float
    candidate: float | None
    base: float | None
    champion: float | None  # None: there was no champion to beat
    max_drop: float | None = None  # the guard: how far a benchmark may fall below the base (a fraction of it)
    guards: tuple[Guard, ...] = ()  # one per benchmark metric compared

    def summary(self) -> str:
        return ("promoted to champion: " if self.promote else "kept as challenger: ") + "; ".join(self.reasons)


def finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def guard(task: str, row: Mapping[str, object], max_drop: float) -> Guard:
    """Does the candidate's benchmark `row` (metric, higher_is_better, base, tuned) stay within `max_drop`
    (a fraction of the base's value, in the metric's bad direction) of its base? Not finite: no."""
    metric, higher = str(row.get("metric") or "metric"), row.get("higher_is_better", True) is not False
    base, tuned = finite(row.get("base")), finite(row.get("tuned"))
    name = f"guard {task} {metric}"
    if base is None or tuned is None:
        which, value = ("the base's", row.get("base")) if base is None else ("the candidate's", row.get("tuned"))
        reason = f"{name}: {which} value is not a finite number ({value!r}), so it cannot pass"
        return Guard(task, metric, higher, base, tuned, None, False, reason)
    allowed = max_drop * abs(base)
    drop = base - tuned if higher else tuned - base
    rule = (
        f"allowed {allowed:.4g}: max drop {max_drop * 100:g}% of the base, {'higher' if higher else 'lower'} is better"
    )
    if drop <= allowed or math.isclose(drop, allowed, rel_tol=1e-9):
        reason = (
            f"{name} {tuned:.4g} stays within the guard of the base's {base:.4g} (drop {max(drop, 0.0):.4g}, {rule})"
        )
        return Guard(task, metric, higher, base, tuned, allowed, True, reason)
    reason = f"{name} {tuned:.4g} fell {drop:.4g} from the base's {base:.4g}, beyond the guard ({rule})"
    return Guard(task, metric, higher, base, tuned, allowed, False, reason)


def guard_setting(max_drop: float | None) -> float | None:
    """The guard's max drop, or None for no guard: a negative value (a KFP float parameter has no None) is none."""
    return None if max_drop is None or max_drop < 0 else max_drop


def guards(benchmarks: Mapping[str, Mapping[str, object]] | None, max_drop: float | None) -> tuple[Guard, ...]:
    """Every benchmark metric held to its base; none when no guard is set or no benchmark ran."""
    if max_drop is None:
        return ()
    if not (max_drop >= 0 and math.isfinite(max_drop)):
        raise KftuneError(f"guard_max_drop must be a finite number >= 0 (--guard_max_drop), got {max_drop}")
    return tuple(guard(task, row, max_drop) for task, row in sorted((benchmarks or {}).items()))


def decide(
    candidate: Mapping[str, float],
    base: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metric: str = DEFAULT_METRIC,
    margin: float = DEFAULT_MARGIN,
    champion_label: str = "the champion",
    benchmarks: Mapping[str, Mapping[str, object]] | None = None,
    max_drop: float | None = None,
) -> Decision:
    """Promote when the candidate beats its base by `margin` (a fraction of the base's value) on
    `metric` and is strictly better than the champion (a tie keeps the incumbent), and, with a guard
    (`max_drop`), every benchmark metric (metrics.json's "benchmarks") stays within `max_drop` of its
    base, direction-aware. No guard, or no benchmark: the primary rule alone.

    `champion` is None when there is none; its metrics must come from the same eval data and
    settings as the candidate's (the caller re-scores it otherwise). A missing or non-finite
    number never promotes, the champion's and a guarded benchmark's included. One reason per
    comparison: the base's, then each guard's, then the champion's.
    """
    if metric not in DIRECTIONS:
        raise KftuneError(f"unknown primary metric {metric!r} (--primary-metric); one of {', '.join(DIRECTIONS)}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise KftuneError(f"margin must be a finite number >= 0 (--promotion-margin), got {margin}")
    higher = DIRECTIONS[metric]
    cand, ref = finite(candidate.get(metric)), finite(base.get(metric))
    champ = finite(champion.get(metric)) if champion is not None else None

    max_drop = guard_setting(max_drop)
    checked = guards(benchmarks, max_drop)
    notes = tuple(g.reason for g in checked)
    if max_drop is not None and not checked:
        notes = (f"no benchmark ran, so the guard (max drop {max_drop * 100:g}%) had nothing to compare",)

    def verdict(promote: bool, first: str, *rest: str) -> Decision:
        promote = promote and all(g.passed for g in checked)
        return Decision(promote, (first, *notes, *rest), metric, margin, cand, ref, champ, max_drop, checked)

    if cand is None:
        return verdict(False, f"the candidate has no finite {metric} ({candidate.get(metric)!r})")
    if ref is None:
        return verdict(False, f"the base has no finite {metric} ({base.get(metric)!r}) to compare with")
    need = margin * abs(ref)
    gain = cand - ref if higher else ref - cand
    rule = f"needed {need:.4g}: margin {margin * 100:g}% of the base"
    enough = gain > 0 and (gain >= need or math.isclose(gain, need, rel_tol=1e-9))  # 40.4 - 40.0 is 0.39999...
    if not enough:
        return verdict(
            False,
            f"{metric} {cand:.4g} does not beat the base's {ref:.4g} by the margin (improvement {gain:.4g}, {rule})",
        )
    beats_base = f"{metric} {cand:.4g} beats the base's {ref:.4g} by {gain:.4g} ({rule})"
    if champion is None:
        return verdict(True, beats_base, "there is no champion yet")
    if champ is None:  # never replace what cannot be compared with; a person can still move the alias
        return verdict(
            False, beats_base, f"{champion_label} has no finite {metric} ({champion.get(metric)!r}) to compare with"
        )
    if _better(cand, champ, higher):
        return verdict(True, beats_base, f"{metric} {cand:.4g} beats {champion_label}'s {champ:.4g}")
    return verdict(False, beats_base, f"{metric} {cand:.4g} does not beat {champion_label}'s {champ:.4g}")


def benchmark_values(evaluation: Mapping[str, object], tuned: str, base: str) -> dict[str, float]:
    """The benchmark scores of metrics.json as flat names (`<prefix><task>_<metric>`), finite ones only."""
    values = {}
    for task, row in (evaluation.get("benchmarks") or {}).items():
        for prefix, side in ((tuned, "tuned"), (base, "base")):
            if finite(row.get(side)) is not None:
                values[f"{prefix}{task}_{row['metric']}"] = float(row[side])
    return values


def guard_tags(decision: Decision) -> dict[str, str]:
    """The guard's setting and every guarded metric's numbers and verdict, as version tags."""
    if decision.max_drop is None:
        return {}
    tags = {"gate.guard_max_drop": str(decision.max_drop)}
    for g in decision.guards:
        tags[f"guard.{g.task}.{g.metric}"] = (
            f"{'pass' if g.passed else 'fail'}: base {g.base} tuned {g.tuned} allowed drop {g.allowed}"
        )
    return tags
