"""The run folder: resume checks contents (weights, model config, input listing), damaged state and a
full disk are one-line errors or redone shards, one run at a time holds a folder, and exit statuses."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import fsspec
import open_clip
import pytest
import torch
from conftest import REPO, TINY_CONFIG, cli_in_process, jpeg_bytes, read_output
from test_predict import predict

from clip_fabric import run_folder
from clip_fabric.config import DataArgs
from clip_fabric.run_folder import EXIT_NO_ROWS, EXIT_RESUME, LOCK_FILE, RunFolder, file_digest
from clip_fabric.writers import ShardWriter


def folder_data(root, **kw) -> DataArgs:
    return DataArgs(format="folder", source=str(root), shard_size=4, num_workers=0, **kw)


def predict_args(out, config, data_source, *more) -> list[str]:
    return [
        "predict", "--accelerator", "cpu", "--model.config", str(config), "--output.dir", str(out),
        "--data.format", "folder", "--data.source", str(data_source), "--data.shard_size", "4",
        "--data.num_workers", "0", *more,
    ]  # fmt: skip


# -- the fingerprint covers contents ---------------------------------------------------------------


def test_replaced_checkpoint_or_model_config_at_the_same_path_is_refused(tmp_path, image_folder):
    """Issue 19 item 4: a checkpoint or config JSON replaced in place must not mix weights in one folder."""
    config = tmp_path / "swap-clip.json"  # its own name: the registry is shared with the other tests
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    weights = tmp_path / "swap.pt"
    torch.save({"state_dict": open_clip.create_model("swap-clip").state_dict()}, weights)
    out, _ = predict(tmp_path, config, folder_data(image_folder), pretrained=weights)
    (out / "_done" / "2.json").unlink()  # a crash before the last shard

    torch.manual_seed(2)
    torch.save({"state_dict": open_clip.create_model("swap-clip").state_dict()}, weights)
    with pytest.raises(ValueError, match="different weights:"):
        predict(tmp_path, config, folder_data(image_folder), pretrained=weights)

    torch.manual_seed(1)
    torch.save({"state_dict": open_clip.create_model("swap-clip").state_dict()}, weights)  # as at first
    config.write_text(json.dumps(TINY_CONFIG | {"embed_dim": 16}))
    with pytest.raises(ValueError, match="different model_config:"):
        predict(tmp_path, config, folder_data(image_folder), pretrained=weights)
    assert len(list((out / "_done").glob("*.json"))) == 2  # nothing written by the refused runs


def test_large_files_are_fingerprinted_by_size_mtime_and_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "FULL_HASH_MAX", 1000)
    monkeypatch.setattr(run_folder, "PARTIAL", 100)
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 8)
    first = file_digest(path)
    assert set(first) == {"size", "mtime_ns", "sha256_head_tail"}

    def rewritten(data: bytes) -> dict:
        stat = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: only the bytes differ
        return file_digest(path)

    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    assert rewritten(bytes(data)) != first  # a changed tail
    data[-1] ^= 1
    assert rewritten(bytes(data)) == first
    os.utime(path, ns=(1, 1))
    assert file_digest(path) != first  # touched: taken as another file
    small = tmp_path / "small.json"
    small.write_text("{}")
    assert set(file_digest(small)) == {"size", "sha256"}


# -- the stored shard plan ----------------------------------------------------------------------


def test_input_changed_in_done_shards_is_refused(tmp_path, tiny_config, image_folder):
    """Adding or removing an image shifts every shard after it: resuming would lose or repeat rows."""
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    assert len(json.loads((out / "plan.json").read_text())) == 3
    (out / "_done" / "2.json").unlink()  # a crash before the last shard
    (image_folder / "a" / "img000.jpg").write_bytes(jpeg_bytes(99, (30, 30)))  # sorts into shard 0
    with pytest.raises(ValueError, match=r"done shard\(s\) 0, 1 now list other samples"):
        predict(tmp_path, tiny_config, folder_data(image_folder))
    (image_folder / "a" / "img000.jpg").unlink()
    (image_folder / "b" / "img04.jpg").unlink()  # in shard 1
    with pytest.raises(ValueError, match=r"done shard\(s\) 1 now list other samples"):
        predict(tmp_path, tiny_config, folder_data(image_folder))


def test_input_changed_only_in_shards_not_done_is_embedded_as_listed_now(tmp_path, tiny_config, image_folder):
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    (out / "_done" / "2.json").unlink()
    (image_folder / "b" / "img99.jpg").write_bytes(jpeg_bytes(99, (30, 30)))  # sorts last: shard 2
    _, summary = predict(tmp_path, tiny_config, folder_data(image_folder))

    listed = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*g"))
    assert read_output(out)[1] == listed and len(listed) == 12  # every image once, the new one too
    assert summary["this_run"]["rows"] == 4 and summary["rows"] == 12


# -- damaged state ------------------------------------------------------------------------------


def test_damaged_run_json_is_a_one_line_error_naming_it(capsys, tmp_path, tiny_config, image_folder):
    out = tmp_path / "out"
    assert cli_in_process(capsys, *predict_args(out, tiny_config, image_folder)).returncode == 0
    (out / "run.json").write_text("")  # what a full disk left before run.json was written atomically
    result = cli_in_process(capsys, *predict_args(out, tiny_config, image_folder))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clip_fabric: error: {out / 'run.json'} is damaged")
    assert "--output.overwrite true" in last
    overwrite = cli_in_process(
        capsys, *predict_args(out, tiny_config, image_folder), "--output.overwrite", "true"
    )
    assert overwrite.returncode == 0 and json.loads((out / "run.json").read_text())["fingerprint"]


def test_damaged_done_markers_mean_their_shards_are_redone(tmp_path, tiny_config, image_folder, caplog):
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    (out / "_done" / "1.json").write_text('{"shard": 1, "ro')  # cut
    (out / "_done" / "2.json").write_text("{}")  # not a record
    _, summary = predict(tmp_path, tiny_config, folder_data(image_folder))

    assert summary["this_run"]["rows"] == 4 + 3 and summary["rows"] == 11 and summary["shards_done"] == 3
    assert len(read_output(out)[1]) == 11
    assert f"{out / '_done' / '1.json'} is damaged" in caplog.text


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root and mount")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount, leave: int) -> None:
    """Fill the disk but for about ``leave`` bytes."""
    stat = os.statvfs(mount)
    with open(mount / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_full_disk_is_a_one_line_error_and_the_rerun_resumes(capsys, small_disk, tiny_config, image_folder):
    out = small_disk / "out"
    args = predict_args(out, tiny_config, image_folder, "--data.shard_size", "2", "--output.dtype", "float32")
    fill(small_disk, leave=7 * 4096)  # run.json, plan.json and a shard or so: the disk fills mid-run
    full = cli_in_process(capsys, *args)
    assert full.returncode == 1
    last = full.stderr.strip().splitlines()[-1]  # after the progress bar, which has no newline of its own
    assert "clip_fabric: error: no space left on the device writing " in last
    assert "rerun the same command to resume" in last
    assert not list(out.rglob("*.tmp"))  # no half-written file left
    assert json.loads((out / "run.json").read_text())["fingerprint"]  # whole, or the rerun could not start
    done_before = sum(json.loads(p.read_text())["rows"] for p in (out / "_done").glob("*.json"))
    assert done_before < 11

    (small_disk / "filler").unlink()
    rerun = cli_in_process(capsys, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    keys = read_output(out)[1]
    assert len(keys) == len(set(keys)) == 11
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_done"] == 6 and summary["this_run"]["rows"] == 11 - done_before


# -- the lock -----------------------------------------------------------------------------------


def test_a_busy_folder_is_refused_naming_its_holder(capsys, tmp_path, tiny_config, image_folder):
    out = tmp_path / "out"
    with RunFolder(out).lock():
        result = cli_in_process(capsys, *predict_args(out, tiny_config, image_folder))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clip_fabric: error: {out} is in use by another run")
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in last
    assert not (out / "img_emb").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, tiny_config, image_folder, caplog):
    out = tmp_path / "out"
    out.mkdir()
    left = {"host": socket.gethostname(), "pid": dead_pid(), "since": "yesterday"}
    (out / LOCK_FILE).write_text(json.dumps(left))  # what kill -9 leaves
    _, summary = predict(tmp_path, tiny_config, folder_data(image_folder))
    assert summary["shards_done"] == 3 and not (out / LOCK_FILE).exists()
    assert f"taking over the lock left by host {left['host']}, pid {left['pid']}" in caplog.text


RACER = """
import sys, time
from pathlib import Path
from clip_fabric.run_folder import RunFolder
out, flags = sys.argv[1], Path(sys.argv[2])
(flags / f"ready-{sys.argv[3]}").touch()
while not (flags / "go").exists():
    time.sleep(0.01)
try:
    with RunFolder(out).lock():
        print("held", flush=True)
        deadline = time.monotonic() + 30
        while not (flags / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
except RuntimeError as err:
    sys.exit(f"clip_fabric: error: {err}")
"""


def test_two_processes_racing_for_a_folder_one_wins(tmp_path):
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    env = os.environ | {"PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), str(flags), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    deadline = time.monotonic() + 20
    while len(list(flags.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    (flags / "go").touch()
    while all(r.poll() is None for r in racers) and time.monotonic() < deadline:
        time.sleep(0.01)  # the loser ends first: the winner holds on until told
    (flags / "release").touch()
    results = [(r, *r.communicate(timeout=20)) for r in racers]

    winners = [r for r, stdout, _ in results if r.returncode == 0 and stdout == "held\n"]
    losers = [(r, err) for r, stdout, err in results if r.returncode == 1 and not stdout]
    assert len(winners) == len(losers) == 1, results
    assert f"pid {winners[0].pid}" in losers[0][1] and "is in use by another run" in losers[0][1]
    assert not (out / LOCK_FILE).exists()  # released


@pytest.mark.slow
def test_two_predict_runs_started_together_embed_each_sample_once(tmp_path, tiny_config, image_folder):
    """Issue 19 item 6 as found: two identical runs started together both embedded every shard."""
    out = tmp_path / "out"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "clip_fabric", *predict_args(out, tiny_config, image_folder)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [run.communicate(timeout=240) for run in runs]

    embedded = sum(int(n) for stdout, _ in results for n in re.findall(r"this run (\d+) rows", stdout))
    assert embedded == 11, results  # the second run was refused, or found every shard done
    for run, other, (_, stderr) in zip(runs, runs[::-1], results, strict=True):
        refused = f"is in use by another run (host {socket.gethostname()}, pid {other.pid}" in stderr
        assert run.returncode == 0 or (run.returncode == 1 and refused), stderr[-2000:]
    keys = read_output(out)[1]
    assert len(keys) == len(set(keys)) == 11


def test_object_store_lock_names_its_holder_and_takes_over_a_dead_one(tmp_path):
    url = f"memory://{tmp_path.name}/lock"
    fs = fsspec.filesystem("memory")
    lock = f"/{tmp_path.name}/lock/{LOCK_FILE}"
    try:
        fs.pipe_file(lock, json.dumps({"host": "gpu-node-7", "pid": 4242, "since": "now"}).encode())
        with pytest.raises(RuntimeError, match=f"host gpu-node-7, pid 4242.*delete {lock}"):
            with RunFolder(url).lock():
                pass
        fs.pipe_file(lock, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
            with RunFolder(url).lock():
                pass
        fs.pipe_file(lock, json.dumps({"host": socket.gethostname(), "pid": dead_pid()}).encode())
        with RunFolder(url).lock():
            assert json.loads(fs.cat_file(lock))["pid"] == os.getpid()
        assert not fs.exists(lock)
    finally:
        if fs.exists(f"/{tmp_path.name}"):
            fs.rm(f"/{tmp_path.name}", recursive=True)


# -- exit statuses ------------------------------------------------------------------------------


def test_exit_status_zero_only_when_every_shard_is_done(capsys, tmp_path, tiny_config, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli_in_process(capsys, *predict_args(tmp_path / "o1", tiny_config, empty))
    assert result.returncode == EXIT_NO_ROWS and "the input holds no samples" in result.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("x.jpg", "y.png"):
        (broken / name).write_bytes(b"<html>not an image</html>")
    result = cli_in_process(capsys, *predict_args(tmp_path / "o2", tiny_config, broken))
    assert (
        result.returncode == EXIT_NO_ROWS
        and "every sample failed (2 recorded in errors/: 2x" in result.stderr
    )

    result = cli_in_process(capsys, *predict_args(tmp_path / "o3", tiny_config, image_folder))
    assert result.returncode == 0 and "clip_fabric: 11 rows" in result.stdout


def test_stopped_with_shards_left_exits_75_and_the_rerun_resumes(
    capsys, tmp_path, tiny_config, image_folder, monkeypatch
):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    add, signalled = ShardWriter.add, []

    def add_then_signal(self, shard, source, finished, errors, last):
        add(self, shard, source, finished, errors, last)
        if last and not signalled:  # the scheduler's signal once the first shard is complete
            signalled.append(shard)
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(ShardWriter, "add", add_then_signal)
    out = tmp_path / "out"
    args = predict_args(out, tiny_config, image_folder, "--data.batch_size", "4")
    stopped = cli_in_process(capsys, *args)
    assert stopped.returncode == EXIT_RESUME, stopped.stderr[-2000:]
    assert "stopped on a signal" in stopped.stdout
    assert "shards are not done: rerun the same command to resume" in stopped.stderr
    assert 1 <= len(list((out / "_done").glob("*.json"))) < 3

    rerun = cli_in_process(capsys, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(read_output(out)[1]) == 11


def test_exit_status_of_summaries():
    base = {"shards_total": 3, "shards_done": 3, "rows": 5, "errors": 1, "filtered": 0}
    assert run_folder.exit_status(base) == (0, None)
    assert run_folder.exit_status(base | {"shards_done": 2})[0] == EXIT_RESUME
    assert run_folder.exit_status(base | {"rows": 0})[0] == EXIT_NO_ROWS
    assert run_folder.exit_status(base | {"rows": 0, "filtered": 4})[0] == 0  # all under --threshold
    assert run_folder.exit_status(base | {"shards_total": 0, "shards_done": 0, "rows": 0})[0] == EXIT_NO_ROWS


def test_a_refusal_names_each_setting_with_its_old_and_new_value():
    """A folder made when auto meant bf16-mixed and shards were 10,000 names what to pass to resume it."""
    from clip_fabric.run_folder import _differences

    before = {"precision": "bf16-mixed", "data": {"shard_size": 10000, "format": "folder"}, "mode": "image"}
    now = {"precision": "bf16-true", "data": {"shard_size": "auto", "format": "folder"}, "mode": "image"}
    assert _differences(before, now) == [
        "data.shard_size: 10000 -> 'auto'",
        "precision: 'bf16-mixed' -> 'bf16-true'",
    ]
    assert _differences(now, now) == []
