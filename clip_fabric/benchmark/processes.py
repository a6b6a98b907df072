"""Running one measurement process: its output to log files, a time limit that stops it and its
children, and the GPU utilisation sampled by ``nvidia-smi`` while it runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path


class GpuSampler:
    """``nvidia-smi`` utilisation of some GPUs every 200 ms while a block runs (nothing without it)."""

    def __init__(self, gpus: list[int]) -> None:
        self.gpus = set(gpus)
        self.samples: list[tuple[float, int, float]] = []  # (seconds, gpu index, utilisation %)
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        cmd = [
            "nvidia-smi",
            "--query-gpu=index,utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                index, util = (float(v) for v in line.split(","))
            except ValueError:
                continue
            if int(index) in self.gpus:
                self.samples.append((time.perf_counter() - self.start, int(index), util))

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.thread.join(timeout=5)

    def summary(self) -> dict:
        """Mean utilisation over the whole process, and over its active span (first to last sample above
        0 % on each GPU: start-up and model loading excluded, stalls in between included)."""
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_active_mean": None}
        active = []
        for gpu in self.gpus:
            utils = [u for _, g, u in self.samples if g == gpu]
            busy = [i for i, u in enumerate(utils) if u > 0]
            if busy:
                active += utils[busy[0] : busy[-1] + 1]
        return {
            "gpu_util_mean": round(sum(u for _, _, u in self.samples) / len(self.samples), 1),
            "gpu_util_active_mean": round(sum(active) / len(active), 1) if active else 0.0,
        }


def visible_gpus(count: int) -> list[int]:
    """nvidia-smi indices of the first ``count`` GPUs a child process will use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if all(v.isdigit() for v in ids):
            return [int(v) for v in ids[:count]]
    return list(range(count))


def run_process(cmd: list[str], log_stem: Path, timeout_s: int, gpus: list[int]) -> dict:
    """Run ``cmd`` with its output in ``log_stem.out``/``.err``, sampling GPU use; stop it on timeout."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    # faulthandler: a run stopped for its time writes where each of its threads was to its .err log.
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    out_log, err_log = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with open(out_log, "w") as out, open(err_log, "w") as err, GpuSampler(gpus) as sampler:
        (log_stem.parent / f"{log_stem.name}.cmd").write_text(" ".join(cmd) + "\n")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
            error = None
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGABRT)  # the traceback of every thread of the main process
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(proc.pid, signal.SIGKILL)  # the process and the ranks and workers it started
            proc.wait()
            returncode, error = None, f"stopped after --timeout_s {timeout_s} s"
    wall = time.perf_counter() - start
    if returncode:
        error = last_line(err_log) or f"exit status {returncode}"
    run = {"returncode": returncode, "error": error, "wall_s": round(wall, 1), "log": str(err_log)}
    return run | sampler.summary()


def last_line(path: Path) -> str | None:
    lines = [ln.strip() for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    error = next((ln for ln in reversed(lines) if ln.startswith("clip_fabric: error:")), None)
    return error or (lines[-1] if lines else None)
