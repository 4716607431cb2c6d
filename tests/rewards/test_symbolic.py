"""SymbolicPool: worker reuse, kill-and-replace on a deadline, start-up kept, several threads at once."""

import threading
import time

import pytest

from posttrain.rewards.safe import VerificationTimeout
from posttrain.rewards.symbolic import SymbolicPool


@pytest.fixture()
def pool():
    pool = SymbolicPool(size=1)
    yield pool
    pool.close()


def _worker_pids(pool: SymbolicPool) -> list[int]:
    return [worker.process.pid for worker in pool._idle]


def test_a_worker_still_starting_at_the_deadline_is_kept_and_then_reused(pool):
    with pytest.raises(VerificationTimeout, match="did not start"):
        pool.equivalent("x^2", "x \\cdot x", timeout_s=0.001)
    (starting,) = _worker_pids(pool)
    assert pool.equivalent("x^2", "x \\cdot x", timeout_s=30) is True
    assert pool.equivalent("x^2", "x^3", timeout_s=30) is False
    assert _worker_pids(pool) == [starting] and pool.killed == 0


def test_a_runaway_worker_is_killed_and_replaced(pool):
    assert pool.equivalent("(x+1)^2", "x^2+2x+1", timeout_s=30) is True
    (first,) = _worker_pids(pool)
    with pytest.raises(VerificationTimeout, match="worker killed"):
        pool.equivalent("1", "9^{9^{9}}", timeout_s=0.5)
    assert pool.killed == 1
    (replacement,) = _worker_pids(pool)
    assert replacement != first
    assert pool._live == 1
    assert pool.equivalent("\\frac{1}{2}", "0.5", timeout_s=30) is True


def test_threads_share_a_small_pool(pool):
    expected = {("\\sqrt{12}", "2\\sqrt{3}"): True, ("x+y", "y+x"): True, ("\\pi", "3"): False}
    expected[("2^{10}", "1024")] = True
    results = {}

    def check(gold, predicted):
        results[(gold, predicted)] = pool.equivalent(gold, predicted, timeout_s=60)

    threads = [threading.Thread(target=check, args=pair, daemon=True) for pair in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert results == expected
    assert pool._live == 1 and pool.killed == 0


def test_a_worker_lost_by_an_interrupted_call_is_reaped_after_its_lease(pool):
    # A call cut off by an enclosing deadline between taking a worker and handing it back loses track of it.
    lost = pool._acquire(time.monotonic() + 0.1, 0.1)
    assert pool._live == 1 and not pool._idle
    # The pool (size 1) is not stuck: once the lease (deadline + grace) runs out, the worker is killed and replaced.
    assert pool.equivalent("x^2", "x \\cdot x", timeout_s=30) is True
    assert lost.process.poll() is not None
    assert pool._live == 1 and len(pool._idle) == 1 and not pool._busy
