"""Issue 27 (stops) and issue 28 item 1: a stop signal ends a run the same way wherever it lands. In
set-up (SIGTERM, SIGUSR1 or Ctrl-C before any shard) the command ends with one line, a SLURM requeue and
exit 75, not the signal's default action; Ctrl-C sent to the process group, as a terminal sends it, ends
a run as SIGTERM does; a data worker killed outright is named in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, cli_in_process, read_output
from test_run_folder import predict_args

from clip_fabric.data.folder import FolderSource
from clip_fabric.run_folder import EXIT_RESUME


def run_script(script: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``script`` (which patches clip_fabric) then ``python -m clip_fabric ARGS``, in its own session so
    that a signal to its process group reaches no test process."""
    code = textwrap.dedent(script) + "\nfrom clip_fabric.__main__ import main\nmain(sys.argv[1:])\n"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | (env or {})
    env = {k: v for k, v in env.items() if v is not None and not (k.startswith("SLURM_") and not v)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_stop_signal_during_set_up_exits_75_and_requeues(capsys, tmp_path, tiny_config, image_folder, sig):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "out"
    script = f"""
        import os, signal, sys
        from clip_fabric.data import folder
        listing = folder.FolderSource.__init__
        def slow_listing(self, *args, **kwargs):  # the signal lands while a large folder is listed
            os.kill(os.getpid(), signal.{sig})
            listing(self, *args, **kwargs)
        folder.FolderSource.__init__ = slow_listing
    """
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    stopped = run_script(script, predict_args(out, tiny_config, image_folder), env)
    assert stopped.returncode == EXIT_RESUME, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"clip_fabric: stopped by {sig} before the open shards were written: rerun the same command to "
        f"resume (exit status {EXIT_RESUME})"
    )
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    rerun = cli_in_process(capsys, *predict_args(out, tiny_config, image_folder))  # the lock was freed
    assert rerun.returncode == 0 and len(read_output(out)[1]) == 11


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_like_sigterm(capsys, tmp_path, tiny_config, image_folder):
    """Before, Ctrl-C printed an 85-line KeyboardInterrupt traceback and the process died of SIGINT."""
    out = tmp_path / "out"
    script = """
        import os, signal, sys
        from clip_fabric.writers import ShardWriter
        add = ShardWriter.add
        def add_then_interrupt(self, shard, source, finished, errors, last):
            add(self, shard, source, finished, errors, last)
            if last and not getattr(ShardWriter, "interrupted", False):
                ShardWriter.interrupted = True
                os.killpg(os.getpgrp(), signal.SIGINT)  # as a terminal sends it: workers get it too
        ShardWriter.add = add_then_interrupt
    """
    args = predict_args(out, tiny_config, image_folder, "--data.batch_size", "2", "--data.shard_size", "2",
                        "--data.num_workers", "2")  # fmt: skip
    stopped = run_script(script, args, {"SLURM_JOB_ID": ""})
    assert stopped.returncode == EXIT_RESUME, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert "received SIGINT: finishing the open shards, then stopping" in stopped.stderr
    assert "shards are not done: rerun the same command to resume" in stopped.stderr
    assert "stopped on a signal" in stopped.stdout and (out / "summary.json").is_file()
    rerun = cli_in_process(capsys, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(read_output(out)[1]) == sorted(
        p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*g")
    )


def test_a_data_worker_killed_outright_is_named(capsys, tmp_path, tiny_config, image_folder, monkeypatch):
    """Before: ``[Errno 104] Connection reset by peer``, or torch's worker error, which names no cause."""
    samples, pid_file = FolderSource.samples, tmp_path / "worker.pid"

    def samples_then_die(self, shard):
        for sample in samples(self, shard):
            if shard.index == 1:  # in the worker that reads shard 1
                pid_file.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            yield sample

    monkeypatch.setattr(FolderSource, "samples", samples_then_die)
    args = predict_args(tmp_path / "out", tiny_config, image_folder, "--data.num_workers", "2")
    result = cli_in_process(capsys, *args)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"clip_fabric: error: a data worker of this rank died (pid {pid_file.read_text()}, killed by SIGKILL)"
    ), result.stderr[-2000:]
    assert "rerun the same command to resume" in last


def test_ctrl_c_reaches_launched_ranks_as_sigterm_and_a_second_one_does_not_wait():
    from clip_fabric.preemption import StopRequest, StopSignal

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(StopSignal), StopRequest(lambda: [child.pid]) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == signal.SIGINT  # the first: finish the open shards
            assert child.wait(timeout=30) == -signal.SIGTERM  # not a SIGINT a rank would take as a second
            os.kill(os.getpid(), signal.SIGINT)  # the second: stop now
            time.sleep(5)
    finally:
        child.kill()
        child.wait()
