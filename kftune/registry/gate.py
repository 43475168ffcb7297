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
class Decision:
    promote: bool
    reasons: tuple[str, ...]  # one sentence per comparison made, in order; the last says why not, when not
    metric: str
    margin: float
    candidate: float | None
    base: float | None
    champion: float | None  # None: there was no champion to beat

    def summary(self) -> str:
        return ("promoted to champion: " if self.promote else "kept as challenger: ") + "; ".join(self.reasons)


def finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def decide(
    candidate: Mapping[str, float],
    base: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metric: str = DEFAULT_METRIC,
    margin: float = DEFAULT_MARGIN,
    champion_label: str = "the champion",
) -> Decision:
    """Promote when the candidate beats its base by `margin` (a fraction of the base's value) on
    `metric` and is strictly better than the champion (a tie keeps the incumbent).

    `champion` is None when there is none; its metrics must come from the same eval data and
    settings as the candidate's (the caller re-scores it otherwise). A missing or non-finite
    number never promotes, the champion's included.
    """
    if metric not in DIRECTIONS:
        raise KftuneError(f"unknown primary metric {metric!r} (--primary-metric); one of {', '.join(DIRECTIONS)}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise KftuneError(f"margin must be a finite number >= 0 (--promotion-margin), got {margin}")
    higher = DIRECTIONS[metric]
    cand, ref = finite(candidate.get(metric)), finite(base.get(metric))
    champ = finite(champion.get(metric)) if champion is not None else None

    def verdict(promote: bool, *reasons: str) -> Decision:
        return Decision(promote, tuple(reasons), metric, margin, cand, ref, champ)

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
