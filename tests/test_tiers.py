"""The test commands the README gives are the ones CI runs, and the fast tier's markers exist."""

from __future__ import annotations

from conftest import REPO


def _readme_commands() -> list[str]:
    tests = (REPO / "README.md").read_text().split("## Tests", 1)[1]
    block = tests.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readmes_full_command_and_the_fast_tier_is_documented():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    full, fast = _readme_commands()
    assert full == "python -m pytest -q" and full in ci
    assert fast == 'python -m pytest -q -m "not slow and not slurm"'


def test_the_tiers_markers_are_registered_and_strict(pytestconfig):
    registered = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert registered >= {"slow", "slurm", "gpu"}
    assert "--strict-markers" in pytestconfig.getini("addopts")
