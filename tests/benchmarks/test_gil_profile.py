import pytest

from benchmarks.gil_profile import parse, summarise

pytestmark = pytest.mark.timeout(30)

RAW = "\n".join([
    "<module> (benchmarks/run.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 5",
    "<module> (benchmarks/run.py:1);run_job (pipelines/run.py:127);"
    "process (/usr/lib/python3/site-packages/apache_beam/x.py:3) 7",
    "Thread._bootstrap (/usr/lib/python3.11/threading.py:1);decode_resize (beam_infer/tasks/classify.py:40);"
    "open (/venv/lib/python3.11/site-packages/PIL/Image.py:3) 4",
    "not a sample line",
])


def test_only_the_jobs_samples_count_and_each_is_put_on_our_innermost_frame_and_the_library_below_it():
    text = summarise(parse(RAW.splitlines()), top=10)
    assert text.startswith("11 samples of the thread holding the GIL during the job (16 in all)")
    assert "      7  63.6%  run_job (pipelines/run.py:127) → apache_beam" in text
    assert "      4  36.4%  decode_resize (beam_infer/tasks/classify.py:40) → PIL" in text
    assert "importlib" not in text


def test_standard_library_and_installed_benchmarks_folders_are_libraries_not_ours():
    from benchmarks.gil_profile import owner

    assert owner(["Thread.run (/usr/lib/python3.11/threading.py:982)"]) == \
        "threading: Thread.run (/usr/lib/python3.11/threading.py:982)"
    frame = "f (/venv/lib/python3.11/site-packages/apache_beam/testing/benchmarks/x.py:1)"
    assert owner([frame]) == f"apache_beam: {frame}"
