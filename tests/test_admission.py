"""The admission bound's arithmetic, without a server."""

import pytest

from serving.admission import Admission, bound_from_budget


def test_bound_is_whole_batches_in_40_percent_of_the_budget():
    assert bound_from_budget(500, 66, 16) == 3 * 16  # 200 ms of 66-ms batches
    assert bound_from_budget(500, 67, 16) == 2 * 16
    assert bound_from_budget(500, 80, 16) == 2 * 16  # int8 here: 32 images, whatever the warm-up's noise
    assert bound_from_budget(50, 80, 16) == 16  # never less than one batch
    with pytest.raises(ValueError):
        bound_from_budget(0, 80, 16)


def test_admission_counts_refuses_past_the_limit_and_says_when_to_retry():
    a = Admission(limit=32, full_batch_ms=400, max_batch_size=16)
    assert a.try_enter(16) and a.try_enter(16) and not a.try_enter(1)
    assert a.in_system == 32
    assert a.retry_after_s() == 1  # two batches of 400 ms: 0.8 s, rounded up
    a.full_batch_ms = 1200
    assert a.retry_after_s() == 3
    a.leave(16)
    assert a.try_enter(16) and a.in_system == 32
    big = Admission(limit=32, full_batch_ms=80, max_batch_size=16)
    assert big.try_enter(50) and not big.try_enter(1)  # alone, a 50-image batch request is served
    big.leave(50)
    assert big.try_enter(1) and not big.try_enter(50)  # beside other work it waits its turn
    unbounded = Admission()  # before warm-up has timed a batch
    assert all(unbounded.try_enter(100) for _ in range(10))
