"""The guard against forgetting, on plain numbers: every benchmark metric of the candidate within a drop
of its base's value (direction-aware), one sentence per comparison, missing numbers never promote."""

import math

import pytest

from kftune.core.errors import KftuneError
from kftune.registry.gate import benchmark_values, decide, guard_tags

GOOD = ({"eval_loss": 3.0}, {"eval_loss": 8.0})  # the primary rule alone would promote


def _bench(base, tuned, metric="acc", higher=True, task="kftune_smoke"):
    return {task: {"metric": metric, "higher_is_better": higher, "base": base, "tuned": tuned, "examples": 24}}


@pytest.mark.parametrize(
    ("base", "tuned", "higher", "max_drop", "passed"),
    [
        (0.80, 0.80, True, 0.1, True),  # unchanged
        (0.80, 0.90, True, 0.0, True),  # better is always within
        (0.80, 0.72, True, 0.1, True),  # exactly 10% of the base lower: still within
        (0.80, 0.71, True, 0.1, False),  # just beyond
        (0.80, 0.79, True, 0.0, False),  # no drop allowed
        (2.00, 2.20, False, 0.1, True),  # lower is better (perplexity-like): 10% higher is within
        (2.00, 2.21, False, 0.1, False),  # and beyond it fails
        (2.00, 1.00, False, 0.0, True),  # lower-is-better improvement
        (-4.0, -4.3, True, 0.1, True),  # a negative base: the allowance is 10% of its magnitude
        (-4.0, -4.5, True, 0.1, False),
    ],
)
def test_the_guard_is_direction_aware_and_relative_to_the_base(base, tuned, higher, max_drop, passed):
    decision = decide(*GOOD, None, benchmarks=_bench(base, tuned, higher=higher), max_drop=max_drop)
    assert decision.promote is passed
    (g,) = decision.guards
    assert g.passed is passed and g.allowed == pytest.approx(max_drop * abs(base))
    assert decision.reasons[1] == g.reason  # after the base comparison, before the champion's
    assert ("beyond the guard" in g.reason) is (not passed) and "guard kftune_smoke acc" in g.reason


def test_each_metric_is_one_sentence_and_any_failure_keeps_the_candidate_a_challenger():
    benchmarks = _bench(0.9, 0.3) | _bench(0.5, 0.52, task="arc_easy") | _bench(10.0, 10.5, "ppl", False, "wiki")
    decision = decide(*GOOD, {"eval_loss": 3.5}, benchmarks=benchmarks, max_drop=0.1)
    assert not decision.promote
    assert len(decision.reasons) == 5  # base, three guards, champion
    assert decision.reasons[1].startswith("guard arc_easy acc 0.52 stays within the guard of the base's 0.5")
    assert decision.reasons[2].startswith("guard kftune_smoke acc 0.3 fell 0.6 from the base's 0.9, beyond the guard")
    assert decision.reasons[3].startswith("guard wiki ppl 10.5 stays within")
    assert decision.reasons[4] == "eval_loss 3 beats the champion's 3.5"
    assert decision.summary().startswith("kept as challenger: ")
    tags = guard_tags(decision)
    assert tags["gate.guard_max_drop"] == "0.1"
    assert tags["guard.kftune_smoke.acc"] == "fail: base 0.9 tuned 0.3 allowed drop 0.09000000000000001"
    assert tags["guard.arc_easy.acc"].startswith("pass: base 0.5 tuned 0.52")


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, "0.5", True])
@pytest.mark.parametrize("side", ["base", "tuned"])
def test_a_missing_or_non_finite_guard_metric_never_promotes(bad, side):
    row = _bench(0.5, 0.5)
    row["kftune_smoke"][side] = bad
    decision = decide(*GOOD, None, benchmarks=row, max_drop=0.5)
    assert not decision.promote
    assert (
        "not a finite number" in decision.reasons[1]
        and ("the base's" if side == "base" else "the candidate's") in decision.reasons[1]
    )


def test_no_guard_or_no_benchmark_is_todays_rule():
    today = decide(*GOOD, None)
    assert decide(*GOOD, None, benchmarks=_bench(0.9, 0.1)) == today  # benchmarks shown, not guarded
    assert decide(*GOOD, None, benchmarks=_bench(0.9, 0.1), max_drop=-1.0) == today  # negative: no guard
    unguarded = decide(*GOOD, None, benchmarks={}, max_drop=0.05)
    assert unguarded.promote and unguarded.reasons[1].startswith("no benchmark ran, so the guard")
    assert guard_tags(today) == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_bad_guard_is_refused(bad):
    with pytest.raises(KftuneError, match="guard_max_drop must be a finite number"):
        decide(*GOOD, None, benchmarks=_bench(0.5, 0.5), max_drop=bad)


def test_benchmark_values_are_flat_metric_names():
    rows = _bench(0.9, 0.3) | _bench(None, 0.5, task="arc_easy")
    assert benchmark_values({"benchmarks": rows}, "bench_", "base_bench_") == {
        "bench_kftune_smoke_acc": 0.3,
        "base_bench_kftune_smoke_acc": 0.9,
        "bench_arc_easy_acc": 0.5,
    }


@pytest.mark.parametrize("pipeline", ["finetune", "sweep"])
def test_both_pipelines_compile_with_the_guard_parameters_and_refuse_a_bad_mix(pipeline, tmp_path):
    import yaml

    from kftune.core.errors import ConfigError
    from pipelines.compile import compile_pipeline
    from pipelines.parameters import resolve_parameters

    out = compile_pipeline(tmp_path / f"{pipeline}.yaml", pipeline)
    spec = next(yaml.safe_load_all(out.read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    for name, kind, default in (
        ("data_mix", "STRING", ""),
        ("benchmarks", "STRING", ""),
        ("benchmark_limit", "NUMBER_INTEGER", 0),
        ("guard_max_drop", "NUMBER_DOUBLE", -1.0),
    ):
        assert inputs[name]["parameterType"] == kind and inputs[name]["defaultValue"] == default, name
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    (train,) = [d["tasks"]["train"] for d in dags if "train" in d["tasks"]]
    assert train["inputs"]["parameters"]["data_mix"]["componentInputParameter"].endswith("data_mix")
    (evaluate,) = [d["tasks"]["evaluate"] for d in dags if "evaluate" in d["tasks"]]
    assert {"benchmarks", "benchmark_limit", "guard_max_drop"} <= set(evaluate["inputs"]["parameters"])
    bad = {"data_uri": "d.jsonl", "data_mix": '[{"uri": "g.jsonl", "weight": 0.7}, {"uri": "h.jsonl", "weight": 0.4}]'}
    with pytest.raises(ConfigError, match="data_mix: the weights sum to 1.1"):  # before anything runs
        resolve_parameters(bad, pipeline)
