"""What a run reports as it goes and at its end: one progress bar on rank 0 with the rows of every
rank (added up through the process group's store, not a collective, so ranks never wait on it), and
this rank's counts, batch latencies and steady-state rate for the summary."""

from __future__ import annotations

import time

from tqdm import tqdm

from clip_fabric.launch import job_store

_REPORT_EVERY_S = 0.25


class Progress:
    def __init__(self, rank: int, total: int | None, unit: str, counts: bool) -> None:
        self.rank, self.counts = rank, counts
        self.rows = self.errors = self.filtered = 0
        self.latencies: list[float] = []
        self.first_batch_at: float | None = None  # steady state: from the first batch out
        self.rows_at_first = 0
        self._store = job_store()
        self._unreported, self._last_report = 0, time.perf_counter()
        self._bar = tqdm(
            desc="embedding",
            total=total,
            unit=f" {unit}",
            smoothing=0.1,
            dynamic_ncols=True,
            disable=rank != 0,
        )

    def add(self, rows: int, errors: int, filtered: int, latency: float) -> None:
        """One batch written (ranks that do not write what they compute pass ``counts=False``)."""
        now = time.perf_counter()
        rows, errors, filtered = (n * self.counts for n in (rows, errors, filtered))
        self.rows, self.errors, self.filtered = (
            self.rows + rows,
            self.errors + errors,
            self.filtered + filtered,
        )
        self.latencies.append(latency)
        if self.first_batch_at is None:
            self.first_batch_at, self.rows_at_first = now, self.rows
        self._unreported += rows + errors + filtered
        if now - self._last_report >= _REPORT_EVERY_S:
            self._report(now)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the bar however the loop ends, so an error's line starts a line of its own."""
        self.close()

    def close(self) -> None:
        self._report(time.perf_counter())
        self._bar.close()

    def _report(self, now: float) -> None:
        if self._store is not None:
            try:
                total = self._store.add("clip_fabric/progress", self._unreported)
            except RuntimeError:  # the store's rank is gone: the run is failing, count this rank alone
                self._store = None
                self._bar.update(self._unreported)
            else:
                self._bar.update(total - self._bar.n)
        else:
            self._bar.update(self._unreported)
        self._unreported, self._last_report = 0, now

    def steady_rate(self, end: float) -> float | None:
        """This rank's samples/s after its first batch was written; None with too little to measure."""
        if self.first_batch_at is None or end - self.first_batch_at < 0.5 or self.rows <= self.rows_at_first:
            return None
        return round((self.rows - self.rows_at_first) / (end - self.first_batch_at), 1)

    def latency_ms(self) -> dict | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        pick = lambda q: round(1000 * ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)  # noqa: E731
        return {"p50": pick(0.5), "p95": pick(0.95), "mean": round(1000 * sum(ordered) / len(ordered), 2)}
