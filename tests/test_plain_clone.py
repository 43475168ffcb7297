"""The suite passes from a plain clone: no test reaches outside the repository except through conftest's
external-data fixture, which skips, saying why, where that data is absent or hidden."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import EXTERNAL_ALPACA, REPO

OUTSIDE = re.compile(r"REPO\.parent|parents\[[2-9]\]|[\"'/]shared/external|\.\./shared")


def test_only_conftest_names_files_beside_the_checkout():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        if path.name not in {"conftest.py", "test_plain_clone.py"} or path.parent != REPO / "tests"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, "use the alpaca_array fixture (tests/conftest.py) instead:\n" + "\n".join(offenders)


def test_with_the_external_folder_hidden_reading_it_fails_the_test():
    probe = (
        "import tests.conftest as c\n"
        "try:\n    open(c.EXTERNAL_ALPACA, 'rb')\n"
        "except FileNotFoundError as e:\n    print(e)\n"
        "print(c.external_alpaca())\n"
    )
    env = {**os.environ, "KFTUNE_TESTS_HIDE_EXTERNAL": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        f"{EXTERNAL_ALPACA}: a test read a file outside the repository (KFTUNE_TESTS_HIDE_EXTERNAL=1)",
        "None",
    ]


def test_every_test_on_the_alpaca_fixture_is_selected_by_the_external_data_mark():
    """`make test-plain-clone` selects with `-m external_data`: the fixture's mark must be there before `-m` reads it."""
    args = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "external_data"]
    out = subprocess.run([*args, "tests"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    selected = [line for line in out.splitlines() if "::" in line]
    for test in ("test_llama_factory_json_array_loads", "test_the_gate_stop_line_names", "test_a_gate_stop_through"):
        assert sum(test in line for line in selected) == 2, (test, selected)  # [generated] and [external]
