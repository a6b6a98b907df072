"""What ranks share through the process group's key-value store, without a collective, tested on a real
``torch.distributed.HashStore`` shared by several ranks' objects in one process: the stop request
(``preemption.JobStop``) and the progress count (``progress.Progress``)."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from clip_fabric import progress
from clip_fabric.preemption import JobStop, StopRequest


class GoneStore:
    """A store whose server (rank 0's) has gone: every request fails as torch's do."""

    def set(self, key: str, value: str) -> None:
        raise RuntimeError("Connection reset by peer")

    def check(self, keys: list[str]) -> bool:
        raise RuntimeError("Connection reset by peer")

    def add(self, key: str, amount: int) -> int:
        raise RuntimeError("Connection reset by peer")


# -- JobStop -------------------------------------------------------------------------------------------


def test_one_ranks_signal_stops_every_rank():
    store = dist.HashStore()
    with StopRequest() as signalled:
        ranks = [JobStop(signalled, store, every_s=0), JobStop(StopRequest(), store, every_s=0)]
        assert [stop() for stop in ranks] == [False, False]
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this (the main) thread before kill returns
        assert signalled.signal == signal.SIGUSR1
        assert [stop() for stop in ranks] == [True, True]  # rank 0 publishes, then rank 1 sees it
    assert all(stop.raised for stop in ranks)
    assert store.get(JobStop.KEY) == b"1"


def test_a_rank_asks_the_store_at_most_every_every_s():
    store = dist.HashStore()
    signalled = StopRequest()
    patient = JobStop(StopRequest(), store, every_s=3600)
    assert not patient()  # asked once now
    signalled.signal = signal.SIGTERM
    assert JobStop(signalled, store)()
    assert not patient()  # not asked again within the hour
    assert JobStop(StopRequest(), store, every_s=0)()  # a rank that asks now sees the request


def test_a_stop_request_stays_raised():
    store = dist.HashStore()
    signalled = StopRequest()
    signalled.signal = signal.SIGTERM
    JobStop(signalled, store)()
    other = JobStop(StopRequest(), store, every_s=0)
    assert other()
    store.delete_key(JobStop.KEY)
    assert other() and other.raised  # the loop finishes its open shards, whatever the store says now


def test_without_a_store_or_with_one_gone_only_the_signalled_rank_stops():
    for store in (None, GoneStore()):
        signalled = StopRequest()
        signalled.signal = signal.SIGTERM
        assert JobStop(signalled, store)()
        assert not JobStop(StopRequest(), store, every_s=0)()


# -- Progress ------------------------------------------------------------------------------------------


@pytest.fixture
def shared_store(monkeypatch) -> dist.HashStore:
    """One store for every Progress made in the test, as ranks of one job share theirs; a report on
    every batch instead of every quarter second."""
    store = dist.HashStore()
    monkeypatch.setattr(progress, "job_store", lambda: store)
    monkeypatch.setattr(progress, "_REPORT_EVERY_S", 0.0)
    return store


def test_rank_0s_bar_counts_every_ranks_rows(shared_store):
    bar0, bar1 = progress.Progress(0, 20, "samples", True), progress.Progress(1, 20, "samples", True)
    bar1.add(rows=5, errors=1, filtered=0, latency=0.01)
    bar0.add(rows=3, errors=0, filtered=2, latency=0.01)
    assert bar0._bar.n == 11  # rank 1's 6 samples and rank 0's 5, from the store
    bar1.add(rows=4, errors=0, filtered=0, latency=0.01)
    bar1.close()
    bar0.close()
    assert bar0._bar.n == 15 and int(shared_store.add("clip_fabric/progress", 0)) == 15
    assert (bar0.rows, bar0.errors, bar0.filtered) == (3, 0, 2)  # its own counts, for the summary
    assert (bar1.rows, bar1.errors, bar1.filtered) == (9, 1, 0)


def test_a_rank_that_does_not_write_adds_nothing(shared_store):
    """Tensor-parallel ranks of one group compute the same batches; only the first one counts them."""
    writer, follower = progress.Progress(0, 8, "samples", True), progress.Progress(1, 8, "samples", False)
    follower.add(rows=4, errors=0, filtered=0, latency=0.01)
    writer.add(rows=4, errors=0, filtered=0, latency=0.01)
    follower.close()
    writer.close()
    assert writer._bar.n == 4 and follower.rows == 0
    assert len(follower.latencies) == 1  # it still times its batches


def test_a_store_gone_counts_this_rank_alone(monkeypatch):
    monkeypatch.setattr(progress, "job_store", GoneStore)
    monkeypatch.setattr(progress, "_REPORT_EVERY_S", 0.0)
    bar = progress.Progress(0, 10, "samples", True)
    bar.add(rows=3, errors=1, filtered=0, latency=0.01)
    bar.add(rows=2, errors=0, filtered=0, latency=0.01)
    bar.close()
    assert bar._bar.n == 6 and bar._store is None
