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
