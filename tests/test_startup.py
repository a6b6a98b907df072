"""Start-up (docs/startup.md): ``--help`` and ``doctor`` do not import what they do not use. torch,
Lightning and open_clip take seconds to import, and ``doctor`` runs on every task of a Slurm job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

HEAVY = ("torch", "lightning", "open_clip", "torchvision", "torchmetrics", "webdataset", "pyarrow")
# Runs the CLI in a fresh interpreter and prints, as its last line, which of HEAVY it imported.
PROBE = """
import json, sys
from clip_fabric.__main__ import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)))
"""


def imported(*commands: list[str], env: dict[str, str] | None = None) -> list[str]:
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        | {"HF_HUB_OFFLINE": "1"}
        | (env or {})
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands), json.dumps(HEAVY)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_help_of_every_command_imports_no_torch():
    helps = [["--help"]] + [[c, "--help"] for c in ("predict", "evaluate", "verify-precision", "benchmark")]
    assert imported(*helps) == []


@pytest.mark.slow
@pytest.mark.parametrize("env", [{}, {"SLURM_NODELIST": "localhost"}], ids=["alone", "slurm"])
def test_doctor_imports_torch_but_not_lightning_or_open_clip(env):
    """Under Slurm too: the rendezvous host is Fabric's choice without importing Lightning for it."""
    assert imported(["doctor", "--json", "true"], env=env) == ["torch"]


@pytest.mark.slow
def test_exit_skips_the_final_collection():
    """At exit the objects torch and open_clip made are frozen out of the last garbage collections,
    which took about a second of a short run's exit (docs/startup.md)."""
    probe = (
        "import atexit, gc\nfrom clip_fabric.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert gc.get_freeze_count() == 0\natexit._run_exitfuncs()\nprint(gc.get_freeze_count() > 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True"
