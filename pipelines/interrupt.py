"""Ctrl-C and SIGTERM during a job: the job stops within seconds with exit status 128 + the signal's number (130,
143), one line on stderr instead of a traceback, every engine stopped, and the partial outputs gone.

Beam's file sinks write each bundle under `<output>/beam-temp-<name>-<uuid>/` and move the files to their final
names only when the whole write is done, so an interrupted job never leaves rows under final names; the temporary
folders this run made under a local output are removed here (in a bucket they stay: delete `<output>/beam-temp-*`).
A second signal ends the process at once. With a remote runner (Dataflow, a Flink or Spark cluster) the signal
stops the launcher only: cancel the job on the runner too.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator

from beam_infer.engine.engine import close_all_engines
from beam_infer.io.fetch import is_local

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (once: the next one acts as
    the default) and are listed in the yielded list; once one came, Beam's loggers are silenced (they would log the
    interrupt as an error, with a traceback). Outside the main thread nothing is installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt

    def not_beams_once_interrupted(record: logging.LogRecord) -> bool:  # Beam logs the interrupt as an error
        return not (received and record.name.startswith("apache_beam"))

    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(not_beams_once_interrupted)
    previous = {s: signal.signal(s, interrupt) for s in SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for handler in handlers:
            handler.removeFilter(not_beams_once_interrupted)


def temp_dirs(output: str) -> set[str]:
    """Beam's temporary write folders under a local `output` right now (none are looked for in a bucket: that
    would cost the launch a listing)."""
    if not is_local(output):
        return set()
    return set(glob.glob(os.path.join(os.path.expanduser(output), "beam-temp-*")))


def stop_after(signum: int, output: str, temp_before: set[str]) -> SystemExit:
    """Stops every engine, removes the temporary folders made since `temp_before`, says so in one line on stderr,
    and returns the SystemExit (128 + signum) to raise."""
    close_all_engines()
    removed = sorted(temp_dirs(output) - temp_before)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    name = signal.Signals(signum).name
    print(f"beam_infer: stopped by {name}; removed {len(removed)} temporary folder(s) of unfinished writes under "
          f"{output}", file=sys.stderr)
    return SystemExit(128 + signum)
