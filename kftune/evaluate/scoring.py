"""Scores for generated text: ROUGE-L and chrF at character level, and pluggable output checks.

Character level because the sample domain is Chinese, which has no spaces between words:
rouge-score's default tokenizer keeps only ASCII word characters (a Chinese answer would score
0), so it gets a tokenizer that splits into characters; sacrebleu's chrF is character n-grams
already (word_order=0). Checks are named yes/no tests of one output, such as "has a title";
`DEFAULT_CHECKS` suits the sample data's Xiaohongshu posts, and `--checks` adds or replaces them
by name or as `module:attribute`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kftune.core.errors import KftuneError


class CharTokenizer:
    """rouge-score tokenizer: every non-space character is a token."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Character-level ROUGE-L F1 of each prediction against its reference, in [0, 1]."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def chrf(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """(corpus chrF, chrF of each prediction), sacrebleu's defaults (character 6-grams, beta 2), in [0, 100]."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    corpus = metric.corpus_score(list(predictions), [list(references)]).score
    return corpus, [metric.sentence_score(p, [r]).score for p, r in zip(predictions, references, strict=True)]


@dataclass(frozen=True)
class OutputCheck:
    name: str
    description: str
    passes: Callable[[str], bool]


_HASHTAG = re.compile(r"#[^\s#]+")
TITLE_MAX_CHARS = 40
LENGTH_RANGE = (60, 600)  # characters; the sample posts are 100-250


def _has_title(text: str) -> bool:
    """A short first line followed by a body, as a post's title is."""
    lines = [line.strip() for line in text.strip().splitlines()]
    return len(lines) >= 2 and 0 < len(lines[0]) <= TITLE_MAX_CHARS and any(lines[1:])


DEFAULT_CHECKS: tuple[OutputCheck, ...] = (
    OutputCheck("title", f"a first line of at most {TITLE_MAX_CHARS} characters, then a body", _has_title),
    OutputCheck("hashtag", "at least one #hashtag", lambda text: bool(_HASHTAG.search(text))),
    OutputCheck(
        "length",
        f"{LENGTH_RANGE[0]}-{LENGTH_RANGE[1]} characters",
        lambda text: LENGTH_RANGE[0] <= len(text.strip()) <= LENGTH_RANGE[1],
    ),
)
BUILTIN = {check.name: check for check in DEFAULT_CHECKS}


def load_checks(spec: str | None) -> tuple[OutputCheck, ...]:
    """Checks from a comma list: built-in names, or `module:attribute` naming an OutputCheck or a sequence of them.

    None or "default" gives DEFAULT_CHECKS; "" gives none.
    """
    if spec is None or spec == "default":
        return DEFAULT_CHECKS
    checks: list[OutputCheck] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "default":
            checks += DEFAULT_CHECKS
        elif item in BUILTIN:
            checks.append(BUILTIN[item])
        elif ":" in item:
            module, _, attribute = item.partition(":")
            try:
                found = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as exc:
                raise KftuneError(f"--checks {item}: cannot import it ({exc})") from None
            found = (
                [found] if isinstance(found, OutputCheck) else list(found) if isinstance(found, (list, tuple)) else None
            )
            if not found or not all(isinstance(c, OutputCheck) for c in found):
                raise KftuneError(f"--checks {item}: expected a kftune.scoring.OutputCheck or a list of them")
            checks += found
        else:
            raise KftuneError(
                f"--checks {item}: unknown check; built-in ones are {', '.join(BUILTIN)}, or give module:attribute"
            )
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise KftuneError(f"--checks: a check name appears twice ({', '.join(names)})")
    return tuple(checks)


def run_checks(checks: Sequence[OutputCheck], text: str) -> dict[str, bool]:
    return {check.name: bool(check.passes(text)) for check in checks}


def pass_rates(results: Sequence[dict[str, bool]], checks: Sequence[OutputCheck]) -> dict[str, float]:
    """Share of outputs passing each check, and `all`: share passing every one."""
    if not results:
        return {}
    rates = {c.name: sum(r[c.name] for r in results) / len(results) for c in checks}
    rates["all"] = sum(all(r.values()) for r in results) / len(results)
    return rates
