"""The spawn-and-reap helper every multi-process test and benchmark relies on."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.procs import Method, Worker, WorkerError, Workers, run_together


def _report_pid_after_the_barrier(worker: Worker) -> None:
    worker.wait()
    worker.report((worker.index, os.getpid(), time.monotonic()))


def _die(code: int, worker: Worker) -> None:
    os._exit(code)


def _sleep(seconds: float, worker: Worker) -> None:
    time.sleep(seconds)


@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_one_report_per_worker_in_worker_order(method: Method) -> None:
    results = run_together(_report_pid_after_the_barrier, [()] * 3, method=method)
    assert [index for index, _, _ in results] == [0, 1, 2]
    pids = {pid for _, pid, _ in results}
    assert len(pids) == 3 and os.getpid() not in pids


def test_a_dead_worker_fails_collect_fast_and_the_rest_are_reaped() -> None:
    with Workers("spawn", timeout=60) as workers:
        sleeper = workers.start(_sleep, [(60,)])
        workers.start(_die, [(3,)])
        started = time.monotonic()
        with pytest.raises(WorkerError, match=r"without a report, codes \[3\]"):
            workers.collect()
        assert time.monotonic() - started < 30
    assert not sleeper[0].is_alive()


def test_join_raises_on_a_non_zero_exit() -> None:
    with Workers("spawn") as workers, pytest.raises(WorkerError, match="exited with 4"):
        workers.start(_die, [(4,)])
        workers.join()


def test_a_worker_that_never_reports_times_out() -> None:
    with Workers("spawn", timeout=1.0) as workers:
        workers.start(_sleep, [(30,)])
        with pytest.raises(WorkerError, match="did not report in time"):
            workers.collect()
