import pytest

from beam_infer.budget import Budget, FailureBudgetExceeded

pytestmark = pytest.mark.timeout(10)
DEAD = [{"id": "a", "uri": "/a", "stage": "fetch", "error_type": "FileNotFoundError", "message": "no"}]


@pytest.mark.parametrize("budget, dead, records, exceeded", [
    (Budget(), 100, 100, False),
    (Budget(max_dead_letters=0), 0, 10, False),
    (Budget(max_dead_letters=0), 1, 10, True),
    (Budget(max_dead_letters=3), 3, 10, False),
    (Budget(max_fraction=0.1), 1, 10, False),
    (Budget(max_fraction=0.1), 2, 10, True),
    (Budget(max_dead_letters=5, max_fraction=0.1), 3, 10, True),  # either limit is enough to fail
])
def test_the_budget_fails_only_past_either_limit(budget, dead, records, exceeded):
    if exceeded:
        with pytest.raises(FailureBudgetExceeded, match=f"{dead} of {records} records failed"):
            budget.check(dead, records, DEAD)
    else:
        budget.check(dead, records, DEAD)


@pytest.mark.parametrize("kwargs", [{"max_dead_letters": -1}, {"max_fraction": 1.5}])
def test_a_budget_out_of_range_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match="must be"):
        Budget(**kwargs)


def test_a_worker_stops_the_job_as_soon_as_its_own_dead_letters_pass_the_limit():
    from beam_infer.budget import FailureBudgetExceeded, _StopEarly

    stop, other = _StopEarly(max_dead_letters=2), _StopEarly(max_dead_letters=2)
    letters = [{"id": f"r{i}", "uri": f"/r{i}.jpg", "stage": "fetch", "error_type": "OSError", "message": "gone"}
               for i in range(3)]
    stop.process(letters[0])
    stop.process(letters[1])
    other.process(letters[0])  # another pipeline's check counts on its own
    with pytest.raises(FailureBudgetExceeded, match="at least 3 records failed .* at most 2 dead letters") as failed:
        stop.process(letters[2])
    assert "r0 (/r0.jpg): fetch: OSError: gone" in str(failed.value)
    other.process(letters[1])  # still within its limit
