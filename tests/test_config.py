import pickle

import pytest

from beam_infer import config as config_module
from beam_infer.config import EngineConfig

pytestmark = pytest.mark.timeout(30)


def test_automatic_decode_threads_are_a_thread_per_core_counted_where_the_engine_runs(monkeypatch):
    monkeypatch.setattr(config_module, "available_cores", lambda: 2)
    shipped = pickle.dumps(EngineConfig())  # built where the job is launched
    monkeypatch.setattr(config_module, "available_cores", lambda: 16)  # unpickled on a bigger worker
    assert pickle.loads(shipped).decode_pool_size == 16


def test_explicit_decode_threads_are_kept(monkeypatch):
    monkeypatch.setattr(config_module, "available_cores", lambda: 16)
    assert EngineConfig(decode_threads=3).decode_pool_size == 3
