"""The promotion gate's every rule, on plain numbers: base margin, champion, direction, missing values."""

import math

import pytest

from kftune.core.errors import KftuneError
from kftune.registry.gate import DEFAULT_MARGIN, DIRECTIONS, decide

LOSS = "eval_loss"


def _d(candidate, base, champion=None, **kwargs):
    wrap = lambda v: None if v is None else {LOSS: v}
    return decide(wrap(candidate), wrap(base), wrap(champion), **kwargs)


@pytest.mark.parametrize(
    ("candidate", "base", "champion", "margin", "promote"),
    [
        (3.0, 8.0, None, 0.01, True),  # first model, clearly better than its base
        (7.95, 8.0, None, 0.01, False),  # better, but by less than 1% of the base
        (7.92, 8.0, None, 0.01, True),  # exactly the margin is enough
        (8.0, 8.0, None, 0.0, False),  # a tie with the base never promotes, even with no margin
        (7.999, 8.0, None, 0.0, True),  # with no margin any improvement does
        (9.0, 8.0, None, 0.01, False),  # worse than the base
        (3.0, 8.0, 3.5, 0.01, True),  # beats base and champion
        (3.5, 8.0, 3.0, 0.01, False),  # beats base, not the champion
        (3.0, 8.0, 3.0, 0.01, False),  # a tie keeps the incumbent
        (9.0, 8.0, 10.0, 0.01, False),  # beats a weak champion but not its own base
    ],
)
def test_loss_rules(candidate, base, champion, margin, promote):
    decision = _d(candidate, base, champion, margin=margin)
    assert decision.promote is promote
    assert decision.reasons and all(isinstance(r, str) and r for r in decision.reasons)
    assert (decision.candidate, decision.base, decision.champion) == (candidate, base, champion)


def test_reasons_say_what_was_compared():
    first = _d(3.0, 8.0)
    assert first.reasons == (
        "eval_loss 3 beats the base's 8 by 5 (needed 0.08: margin 1% of the base)",
        "there is no champion yet",
    )
    kept = _d(3.5, 8.0, 3.0, champion_label="champion version 2")
    assert kept.reasons[-1] == "eval_loss 3.5 does not beat champion version 2's 3"
    assert kept.summary().startswith("kept as challenger: ")
    small = _d(7.99, 8.0)
    assert len(small.reasons) == 1 and "does not beat the base's 8 by the margin" in small.reasons[0]


@pytest.mark.parametrize("metric", [m for m, higher in DIRECTIONS.items() if higher])
def test_higher_is_better_metrics_flip_the_direction(metric):
    assert decide({metric: 0.6}, {metric: 0.3}, None, metric=metric).promote
    assert not decide({metric: 0.3}, {metric: 0.6}, None, metric=metric).promote
    assert not decide({metric: 0.6}, {metric: 0.3}, {metric: 0.7}, metric=metric).promote
    assert decide({metric: 0.8}, {metric: 0.3}, {metric: 0.7}, metric=metric).promote


def test_the_margin_is_relative_to_the_base_magnitude_for_either_direction():
    assert not decide({"chrf": 40.3}, {"chrf": 40.0}, None, metric="chrf", margin=0.01).promote  # needs +0.4
    assert decide({"chrf": 40.4}, {"chrf": 40.0}, None, metric="chrf", margin=0.01).promote
    assert decide({"checks_pass_rate": 0.1}, {"checks_pass_rate": 0.0}, None, metric="checks_pass_rate").promote


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf, "3.0", True])
def test_a_missing_or_non_finite_candidate_never_promotes(bad):
    candidate = {} if bad is None else {LOSS: bad}
    decision = decide(candidate, {LOSS: 8.0}, None)
    assert not decision.promote and "the candidate has no finite eval_loss" in decision.reasons[0]


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_a_missing_base_number_never_promotes(bad):
    decision = decide({LOSS: 3.0}, {} if bad is None else {LOSS: bad}, None)
    assert not decision.promote and "the base has no finite eval_loss" in decision.reasons[0]


@pytest.mark.parametrize("bad", [None, math.nan])
def test_a_champion_without_a_comparable_number_is_not_replaced(bad):
    decision = decide({LOSS: 3.0}, {LOSS: 8.0}, {} if bad is None else {LOSS: bad}, champion_label="champion version 1")
    assert not decision.promote
    assert decision.reasons[-1].startswith("champion version 1 has no finite eval_loss")


def test_bad_metric_or_margin_is_refused():
    with pytest.raises(KftuneError, match="unknown primary metric 'bleu'"):
        decide({"bleu": 1.0}, {"bleu": 0.0}, None, metric="bleu")
    for margin in (-0.1, math.nan, math.inf):
        with pytest.raises(KftuneError, match="margin must be"):
            decide({LOSS: 1.0}, {LOSS: 2.0}, None, margin=margin)


def test_default_margin_is_one_percent():
    assert DEFAULT_MARGIN == 0.01
    assert _d(7.92, 8.0).promote and not _d(7.921, 8.0).promote
