"""Fabric built in one place: the launch options' shared help, and ranks that die with their launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import REPO

from clip_fabric.evaluate import setup as evaluate_setup
from clip_fabric.launch import LAUNCH_OPTIONS, build_fabric
from clip_fabric.predict import setup as predict_setup
from clip_fabric.strategies.ddp import InferenceDDPStrategy

# A launcher (the parent) starts a rank (the child) and exits, as rank 0 does when it fails.
LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "from clip_fabric.launch import die_with_launcher; "
                          "die_with_launcher(1); print('ready', flush=True); import time; time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
child.stdout.readline()  # the rank has asked to die with its launcher
print(child.pid, flush=True)
"""


def test_a_rank_dies_with_its_launcher():
    env = os.environ | {"PYTHONPATH": str(REPO)}
    launcher = subprocess.run(
        [sys.executable, "-c", LAUNCHER], env=env, capture_output=True, text=True, timeout=60
    )
    pid = int(launcher.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[-1][0] == "Z":
                return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the rank outlived its launcher by 10 s")


def test_commands_share_the_launch_help():
    for command in (predict_setup, evaluate_setup):
        assert "{launch}" not in command.__doc__
        assert "precision: ``auto`` (the fastest precision measured" in command.__doc__
    assert set(LAUNCH_OPTIONS) >= {"accelerator", "devices", "strategy", "precision", "timeout_s"}


def test_build_fabric_takes_a_name_or_a_plugin():
    fabric = build_fabric("cpu", devices=2, strategy="ddp", precision="32-true", timeout_s=42)
    assert isinstance(fabric.strategy, InferenceDDPStrategy)
    assert fabric.strategy._timeout.total_seconds() == 42
    plugin = fabric.strategy.precision
    assert build_fabric("cpu", precision=plugin).strategy.precision is plugin
