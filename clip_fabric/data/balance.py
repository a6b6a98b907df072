"""How many JPEGs the CPU workers decode beside the GPU decoder (``--data.cpu_decode_share``).

On the ``gpu`` path the rank's main process decodes each batch's JPEGs on the device (the call blocks
it) while the DataLoader workers only read and check them, so on varied photos the main process is the
bound and the workers' cores idle. A share of the JPEGs decoded by the workers, as on the ``cpu`` path,
adds their cores to the GPU decoder. The right share depends on the cores, the image sizes and the
model, so ``auto`` measures it while the run goes:

- each worker times its batches: seconds spent on the JPEGs it decoded, and on everything else;
- the main process times, per batch, its device stage (seconds per JPEG it decoded) and the rest of its
  work (the tower's launch, the results, the writer);
- the share is where the two sides take equally long for a batch: with ``W`` workers, ``m + (1 - s) g =
  (b + s c) / W`` (``m``: main seconds per row besides the device stage; ``g``: device stage seconds
  per JPEG; ``b``: worker seconds per row besides decoding; ``c``: worker seconds per decoded JPEG).

The workers read the share from shared memory at every sample, so a new estimate reaches batches begun
after it. Which JPEGs a run decodes where then varies with timing; either path is within 1e-5 cosine of
open_clip's preprocess, so the rows stay within it too (they are no longer bit-identical run to run).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

START = 0.2  # the share before anything is measured: enough JPEGs on the CPU to time them
MOST = 0.75  # auto never leaves the GPU decoder less than a quarter of the JPEGs
SMOOTHING = 0.2  # weight of each new batch in the running per-row costs


@dataclass
class WorkerTimes:
    """A worker's seconds for one batch: decoding JPEGs itself (``decode_s``, ``decoded`` of them) and
    everything else (``other_s``, for ``rows`` rows: reading, checking, packing)."""

    decode_s: float = 0.0
    decoded: int = 0
    other_s: float = 0.0
    rows: int = 0


class DecodeBalance:
    """The share of JPEGs the workers decode: fixed (a number given), or ``auto``, tuned from the times
    of both sides (``observe``). Made before the DataLoader starts its workers, which inherit it."""

    def __init__(self, share: float | str, workers: int) -> None:
        self.auto = share == "auto"
        self.workers = max(workers, 1)
        self._share = multiprocessing.get_context().RawValue("d", START if self.auto else float(share))
        self._costs: dict[str, float] = {}
        self.decoded_on_cpu = 0  # JPEG rows of this run's batches the workers decoded, and all of them
        self.jpeg_rows = 0

    @property
    def share(self) -> float:
        """The share workers apply to the samples they read now (from any process)."""
        return self._share.value

    def observe(self, worker: WorkerTimes | None, stage_s: float, gpu_jpegs: int, main_s: float) -> None:
        """One batch's times: ``worker``'s, the main process's device stage (``stage_s`` for the
        ``gpu_jpegs`` JPEGs it decoded) and the main process's other seconds for it (``main_s``)."""
        if worker is None:
            return
        self.decoded_on_cpu += worker.decoded
        self.jpeg_rows += worker.decoded + gpu_jpegs
        if not self.auto or worker.rows == 0:
            return
        self._smooth("m", main_s / worker.rows)
        self._smooth("b", worker.other_s / worker.rows)
        if gpu_jpegs:
            self._smooth("g", stage_s / gpu_jpegs)
        if worker.decoded:
            self._smooth("c", worker.decode_s / worker.decoded)
        if len(self._costs) == 4:
            self._share.value = balanced_share(**self._costs, workers=self.workers)

    def _smooth(self, name: str, value: float) -> None:
        old = self._costs.get(name)
        self._costs[name] = value if old is None else (1 - SMOOTHING) * old + SMOOTHING * value

    def cpu_fraction(self) -> float | None:
        """The share of this run's JPEG rows the workers decoded, for the summary; None without any."""
        return round(self.decoded_on_cpu / self.jpeg_rows, 3) if self.jpeg_rows else None


def balanced_share(m: float, g: float, b: float, c: float, workers: int) -> float:
    """The share ``s`` in [0, MOST] at which the main process (``m + (1 - s) g`` seconds a row) and the
    ``workers`` together (``(b + s c) / workers``) take equally long; 0 where the workers are the bound
    already, MOST where the CPU decodes so much faster that it would take nearly everything."""
    denominator = g + c / workers
    if denominator <= 0:
        return 0.0
    return min(max((m + g - b / workers) / denominator, 0.0), MOST)


class ShareCounter:
    """A worker's choice, sample by sample, of where each JPEG is decoded: a running credit, so that a
    share ``s`` sends ``s`` of the JPEGs to the CPU evenly (every fourth at 0.25), whatever ``s`` does."""

    def __init__(self) -> None:
        self.credit = 0.0

    def on_cpu(self, share: float) -> bool:
        self.credit += share
        if self.credit >= 1.0 - 1e-9:
            self.credit -= 1.0
            return True
        return False
