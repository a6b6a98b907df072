"""What a run reports as it goes and at its end: one progress bar on rank 0 with the rows of every
rank (added up through the process group's store, not a collective, so ranks never wait on it), and
this rank's counts, batch latencies and steady-state rate for the summary. Where the samples are not
counted before the run (tar shards), the bar shows the shards done of the total and an ETA from them.
The phases before the first batch (model load, zero-shot classifier) each get a line of their own."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from clip_fabric.launch import job_store

_REPORT_EVERY_S = 0.25


def process_seconds(fallback_start: float) -> float:
    """Seconds since this process started (the wall time a user sees, imports included), from
    ``/proc``; where there is none, since ``fallback_start`` (a ``time.perf_counter()``)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), time.perf_counter() - fallback_start)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - fallback_start


@contextmanager
def phase(say: Callable[[str], None], what: str) -> Iterator[None]:
    """``clip_fabric: WHAT ...`` before a phase that prints nothing itself, and its time after it."""
    start = time.perf_counter()
    say(f"clip_fabric: {what} ...")
    yield
    say(f"clip_fabric: {what}: done in {time.perf_counter() - start:.1f} s")


class Progress:
    def __init__(
        self, rank: int, total: int | None, unit: str, counts: bool, shards: int | None = None
    ) -> None:
        """``total`` samples left in the job where known; else every rank counts the shards it ends and
        ``shards``, the shards left (given on rank 0), give the bar its fraction done and ETA."""
        self.rank, self.counts = rank, counts
        self.started = time.perf_counter()  # the loop's start: the rate excludes model load and set-up
        self.count_shards, self.shards_total = total is None, shards
        self.shards_done = self._unreported_shards = 0
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

    def add(self, rows: int, errors: int, filtered: int, latency: float, last: bool = False) -> None:
        """One batch written (ranks that do not write what they compute pass ``counts=False``); ``last``:
        the batch ended its shard."""
        now = time.perf_counter()
        self._unreported_shards += int(last and self.counts)
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
        self._report_shards(now)
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

    def _report_shards(self, now: float) -> None:
        """``shards 3/60, ETA 05:02`` beside the bar, where the samples are not known in advance."""
        if not self.count_shards:
            return
        done = self._unreported_shards
        if self._store is not None:
            try:
                done = self._store.add("clip_fabric/shards", self._unreported_shards)
            except RuntimeError:
                done = self.shards_done + self._unreported_shards
        else:
            done += self.shards_done
        self.shards_done, self._unreported_shards = done, 0
        if self.shards_total is None:
            return  # a rank without the bar
        text = f"shards {done}/{self.shards_total}"
        if 0 < done < self.shards_total:
            left = (now - self.started) * (self.shards_total - done) / done
            text += f", ETA {tqdm.format_interval(left)}"
        self._bar.set_postfix_str(text, refresh=False)

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


def final_line(summary: dict, out_dir: str) -> str:
    """The run's last line: totals of the folder, the most frequent reasons samples were skipped, and
    this run's wall time and embedding rate (start-up, model load and classifier not in the rate)."""
    from clip_fabric.reasons import describe

    this = summary["this_run"]
    reasons = describe(summary.get("error_reasons"))
    return (
        f"clip_fabric: {summary['rows']} rows, {summary['errors']} skipped samples (errors/"
        + (f": {reasons}" if reasons else "")
        + "), "
        + (f"{summary['filtered']} pairs under --threshold, " if summary["filtered"] else "")
        + f"{summary['shards_done']}/{summary['shards_total']} shards in {out_dir}; "
        + (
            "nothing left to do: every shard was done before (summary.json keeps the last run's figures)"
            if summary.get("nothing_left")
            else _this_run(this)
        )
    )


def _this_run(this: dict) -> str:
    return (
        f"this run {this['rows']} rows in {this['seconds']:.1f} s wall "
        f"({this['samples_per_s'] or 0:.1f} samples/s after {this['setup_s']:.1f} s of start-up) on "
        f"{this['world_size']} rank(s)"
    )
