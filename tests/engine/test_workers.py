import threading

import pytest

from beam_infer.engine.workers import Workers

pytestmark = pytest.mark.timeout(20)


def test_calls_run_in_order_of_submission_and_errors_go_to_the_owner():
    errors, seen, done = [], [], threading.Event()
    pool = Workers("beam_infer-test", 1, errors.append)
    pool.submit(seen.append, 1)
    pool.submit(lambda: (_ for _ in ()).throw(ValueError("bad call")))
    pool.submit(seen.append, 2)
    pool.submit(done.set)
    assert done.wait(10)
    assert pool.stop(cancel=False) == []
    assert seen == [1, 2] and [str(e) for e in errors] == ["bad call"]


def test_a_pool_whose_thread_fails_to_start_ends_the_threads_it_started(monkeypatch):
    start = threading.Thread.start
    names = []

    def start_or_fail(thread):
        names.append(thread.name)
        if len(names) == 3:
            raise RuntimeError("can't start new thread (simulated)")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        Workers("beam_infer-partial", 4, lambda e: None)
    monkeypatch.undo()
    started = [t for t in threading.enumerate() if t.name in names[:2]]
    for t in started:
        t.join(10)
    assert len(names) == 3 and not any(t.is_alive() for t in started)
