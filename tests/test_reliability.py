"""Nothing lost, nothing twice: bad inputs, out-of-memory batches, a killed run resumed."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, jpeg_bytes, progress_rows, read_output
from PIL import Image
from test_predict import predict, reference

from clip_fabric.config import DataArgs
from clip_fabric.encode import ChunkedEmbedder
from clip_fabric.model import Embedder
from clip_fabric.run_folder import EXIT_RESUME
from clip_fabric.strategies import build_strategy


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def bad_input_folder(tmp_path):
    """Odd but valid images (embedded as open_clip's PIL path embeds them) beside broken files."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    good = {
        "a_cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "b_16bit.png": encoded(Image.fromarray(rng.integers(0, 65535, (40, 30)).astype(np.uint16)), "PNG"),
        "c_alpha.png": encoded(rgb.convert("RGBA"), "PNG"),
        "d_palette.png": encoded(rgb.convert("P"), "PNG"),
        "e_gray.jpg": encoded(rgb.convert("L"), "JPEG"),
        "f_exif_rotated.jpg": encoded(rgb, "JPEG", exif=exif),
        "g_plain.jpg": jpeg_bytes(3, (50, 40)),
    }
    whole = jpeg_bytes(4, (64, 64))
    bad = {
        "h_truncated.jpg": whole[: len(whole) // 2],
        "i_zero_bytes.jpg": b"",
        "j_not_an_image.jpg": b"<html>404 not found</html>",
        "k_huge.png": encoded(Image.new("RGB", (2000, 1500)), "PNG"),
    }
    root = tmp_path / "corpus"
    root.mkdir()
    for name, data in {**good, **bad}.items():
        (root / name).write_bytes(data)
    return root, sorted(good)


def test_bad_inputs_are_recorded_and_good_ones_embedded(
    tmp_path, tiny_config, tiny_checkpoint, bad_input_folder
):
    root, good = bad_input_folder
    data = DataArgs(
        format="folder", source=str(root), batch_size=3, max_image_pixels=1_000_000, num_workers=0
    )
    out, summary = predict(tmp_path, tiny_config, data, pretrained=tiny_checkpoint, dtype="float32")

    emb, keys = read_output(out)
    assert keys == good and summary["rows"] == 7 and summary["errors"] == 4
    ref = reference(tiny_config, tiny_checkpoint, [Image.open(root / k) for k in keys])
    assert np.all(1 - (emb.astype(np.float64) * ref).sum(-1) < 1e-5)
    errors = pd.read_parquet(out / "errors" / "errors_0.parquet").set_index("key")["reason"]
    assert "truncated" in errors["h_truncated.jpg"]
    assert errors["i_zero_bytes.jpg"] == "empty file"
    assert "cannot identify image file" in errors["j_not_an_image.jpg"]
    assert "DecompressionBomb" in errors["k_huge.png"]


def test_split_and_retry_on_out_of_memory():
    calls = []

    def encode(images, texts):
        calls.append(len(images))
        if len(images) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"image": images * 2}

    encoder = ChunkedEmbedder(encode, max_batch=10)
    images = torch.arange(10.0).unsqueeze(1)
    torch.testing.assert_close(encoder(images, None)["image"], images * 2)
    assert encoder.max_batch == 2 and calls == [10, 5, 2, 2, 2, 2, 2]
    torch.testing.assert_close(encoder(images[:5], None)["image"], images[:5] * 2)  # no retry needed now
    assert calls[-3:] == [2, 2, 1]


def test_other_errors_and_oom_on_one_row_propagate():
    def broken(images, texts):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ChunkedEmbedder(broken, 4)(torch.zeros(4, 1), None)

    def always_oom(images, texts):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        ChunkedEmbedder(always_oom, 4)(torch.zeros(4, 1), None)


def test_predict_survives_injected_oom(tmp_path, tiny_config, tiny_checkpoint, image_folder, monkeypatch):
    data = DataArgs(format="folder", source=str(image_folder), batch_size=5, num_workers=0)
    clean, _ = predict(tmp_path / "clean", tiny_config, data, pretrained=tiny_checkpoint, dtype="float32")
    forward = Embedder.forward

    def small_memory(self, images=None, texts=None):
        if images is not None and len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, images, texts)

    monkeypatch.setattr(Embedder, "forward", small_memory)
    out, summary = predict(tmp_path / "oom", tiny_config, data, pretrained=tiny_checkpoint, dtype="float32")
    assert summary["rows"] == 11 and summary["errors"] == 0
    (a, a_keys), (b, b_keys) = read_output(clean), read_output(out)
    assert a_keys == b_keys
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_collectives_have_the_configured_timeout():
    assert build_strategy("ddp", 2, 1, timeout_s=42)._timeout == timedelta(seconds=42)
    assert build_strategy("auto", 1, 2)._timeout == timedelta(seconds=1800)


# The interrupted runs: 2 CPU ranks over SAMPLES synthetic samples in SHARDS shards of SHARD. The cue to
# interrupt comes within about 0.3 s of the first batches (rank 0's progress bar, or the done markers the
# writer's thread writes behind the loop); 480 samples were once all computed by then on a loaded 2-core
# host, leaving nothing to stop. 4,800 leave seconds of work after it.
SAMPLES, SHARD = 4800, 80
SHARDS = SAMPLES // SHARD


def _two_rank_command(tiny_config, out, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "clip_fabric", "predict", "--accelerator", "cpu", "--devices", "2",
        "--model.config", str(tiny_config), "--data.format", "synthetic",
        "--data.image_size", "[64,48]", "--data.num_samples", str(SAMPLES),
        "--data.shard_size", str(SHARD), "--data.batch_size", "4", "--data.num_workers", str(workers),
        "--output.dir", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_run_resumes_exactly_once(tmp_path, tiny_config):
    out = tmp_path / "out"
    cmd = _two_rank_command(tiny_config, out, workers=1)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while (
        len(list((out / "_done").glob("*.json"))) < 4 and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: launcher, both ranks, their data workers
    proc.wait()
    done_at_kill = len(list((out / "_done").glob("*.json")))
    assert 4 <= done_at_kill < SHARDS, "the run must be killed part-way for this test to mean anything"

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    emb, keys = read_output(out)
    assert keys == [f"{i:09d}" for i in range(SAMPLES)]  # every sample, once, in order
    assert emb.shape == (SAMPLES, 32) and len(list((out / "_done").glob("*.json"))) == SHARDS
    assert f"this run {SAMPLES - SHARD * done_at_kill} rows" in rerun.stdout


@pytest.mark.slow
def test_preemption_signal_stops_cleanly_requeues_and_resumes(tmp_path, tiny_config):
    out = tmp_path / "out"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stands in for SLURM's, recording what it was asked
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    cmd = _two_rank_command(tiny_config, out, workers=2)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242",
                        "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip
    proc, stderr = _start_and_await_rows(cmd, env)
    os.killpg(proc.pid, signal.SIGUSR1)  # SLURM signals every process of the job step
    proc.wait(timeout=120)
    stderr.join()

    assert proc.returncode == EXIT_RESUME, stderr.text()[-3000:]  # shards left (requeued): not 0
    done = sorted(int(p.stem) for p in (out / "_done").glob("*.json"))
    assert 4 <= len(done) < SHARDS
    written = sorted(int(p.stem.split("_")[-1]) for p in (out / "img_emb").glob("img_emb_*.npy"))
    assert written == done and not list(out.rglob(".*.tmp"))  # no half-written shard left behind
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    del env["SLURM_JOB_ID"]
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_output(out)[1] == [f"{i:09d}" for i in range(SAMPLES)]


class _StreamReader(threading.Thread):
    """Drains a child's pipe into memory as it comes, so the test can read it while the child runs."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.chunks = stream, []
        self.start()

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read1(4096), b""):
            self.chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def rows_written(self) -> int:
        return progress_rows(self.text())


def _start_and_await_rows(
    cmd: list[str], env: dict, rows: int = 32
) -> tuple[subprocess.Popen, _StreamReader]:
    """Start ``cmd`` in a session of its own and return once rank 0's progress bar shows ``rows`` (or the
    run ended). The done markers would be too late a cue: the writer's thread writes them behind the loop
    (the first parquet write imports pyarrow), and by the 4th the ranks may have computed every batch."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    stderr = _StreamReader(proc.stderr)
    deadline = time.monotonic() + 180
    while stderr.rows_written() < rows and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return proc, stderr


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the rank process Fabric's launcher started (its environment says LOCAL_RANK)."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in children:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_dead_rank_does_not_hang_the_others(tmp_path, tiny_config):
    out = tmp_path / "out"
    cmd = [*_two_rank_command(tiny_config, out, workers=1), "--timeout_s", "60"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while (
        len(list((out / "_done").glob("*.json"))) < 4 and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.05)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    try:
        proc.wait(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leave nothing behind whatever happened
    assert proc.returncode != 0 and len(list((out / "_done").glob("*.json"))) < SHARDS

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_output(out)[1] == [f"{i:09d}" for i in range(SAMPLES)]


@pytest.mark.slow
def test_a_signal_to_one_tensor_parallel_rank_stops_the_group_together(tmp_path, tiny_config):
    """Ranks that compute each batch together stop before the same batch, whichever of them was told.
    The cue is rank 0's progress bar, not the done markers the writer's thread writes behind the loop:
    by the 4th marker of 240 samples the group had computed every batch in 4 of 12 runs."""
    out, samples = tmp_path / "out", 960
    cmd = [
        sys.executable, "-m", "clip_fabric", "predict", "--accelerator", "cpu", "--devices", "2",
        "--strategy", "tensor_parallel", "--model.config", str(tiny_config), "--data.format", "synthetic",
        "--data.image_size", "[64,48]", "--data.num_samples", str(samples), "--data.shard_size", "8",
        "--data.batch_size", "4", "--data.num_workers", "1", "--output.dir", str(out), "--timeout_s", "60",
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output = _StreamReader(proc.stdout)
    deadline = time.monotonic() + 180
    while output.rows_written() < 32 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only: rank 0 must learn it from rank 1
    try:
        proc.wait(timeout=50)  # within --timeout_s: a clean stop, not a timed-out hang
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    output.join()
    assert proc.returncode == EXIT_RESUME, output.text()[-3000:]  # shards left: "rerun to resume", not 0
    assert "stopped on a signal" in output.text()
    done = len(list((out / "_done").glob("*.json")))
    assert 4 <= done < samples // 8

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_output(out)[1] == [f"{i:09d}" for i in range(samples)]


def _signal_one_rank(tmp_path, tiny_config, workers: int, target) -> tuple[set[int], str]:
    """Run predict on 2 ranks, send SIGTERM to the pid ``target(launcher_pid)`` names once rank 0 wrote 32
    rows, require exit 75 (rerun to resume) and a rerun that completes exactly once; the shards done by
    the stopped run and its stderr."""
    out = tmp_path / "out"
    cmd = _two_rank_command(tiny_config, out, workers)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    proc, stderr = _start_and_await_rows(cmd, env)
    os.kill(target(proc.pid), signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stderr.join()
    assert proc.returncode == 75, stderr.text()[-3000:]  # shards left: rerun to resume
    done = {int(p.stem) for p in (out / "_done").glob("*.json")}
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_output(out)[1] == [f"{i:09d}" for i in range(SAMPLES)]
    return done, stderr.text()


@pytest.mark.slow
def test_a_signal_to_rank_0_alone_stops_every_rank(tmp_path, tiny_config):
    """``docker stop`` or a pod's termination signals only the launcher (rank 0): it passes the signal on
    to the ranks it started, so they finish their open shards too instead of computing all of theirs."""
    done, stderr = _signal_one_rank(tmp_path, tiny_config, 2, lambda launcher: launcher)  # rank 0 only
    rank_1 = set(range(1, SHARDS, 2))  # its split of the shards
    assert done & rank_1 and not rank_1 <= done, sorted(done)  # it worked, and stopped before the end
    assert stderr.count("received SIGTERM") == 2  # rank 0, then rank 1 from rank 0


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_the_job(tmp_path, tiny_config):
    """A signal that reached rank 1 alone is raised for the whole job through the store: rank 0 stops at
    its next shard boundary too, instead of computing all its shards while rank 1 waits for it."""
    done, _ = _signal_one_rank(tmp_path, tiny_config, 1, lambda launcher: _rank_pid(launcher, 1))
    rank_0 = set(range(0, SHARDS, 2))
    assert done & rank_0 and not rank_0 <= done, sorted(done)  # rank 0 worked, and stopped before the end
