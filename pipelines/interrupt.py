"""Ctrl-C and SIGTERM during `python -m pipelines.run`: the job stops within seconds, says so in one line instead of a
traceback, and the process ends by that signal (a shell sees status 130 or 143, and a script's loop stops too).

On the signal, engines stop without waiting for their threads (`interrupt_all`). Beam's file sinks write each bundle
under `<output>/beam-temp-<name>-<uuid>/` and move the files to their final names only in the write's last step, so
an interrupted job leaves no rows under final names unless the signal lands in that last step (then some shards of
a write may be in place: rerun into the same output, which replaces them). The temporary folders this run made under
a local output are removed; in a bucket they stay (delete `<output>/beam-temp-*`). img2img's images already put under
`<output>/images/` stay: puts already queued may still complete in the moment before the process ends, and one cut
short leaves a hidden `.<name>.<hex>.tmp` file there.

Only the command installs this, not a program that calls `main()` (Airflow, a notebook, the tests). With a remote
runner (Dataflow, a Flink or Spark cluster) the signal stops the launcher only: cancel the job on the runner too.
Tested for the default in-process DirectRunner.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence

from beam_infer.engine.engine import close_all_engines, interrupt_all
from beam_infer.io.fetch import is_local

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[list[int]]:
    """Within the block (main thread only), the first SIGINT or SIGTERM is listed in the yielded list, tells the
    engines to stop at once and raises KeyboardInterrupt; any later one of either acts as the default (ends the
    process). Once a signal came, Beam's loggers are silenced: they would log the interrupt as an error, with a
    traceback."""
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        interrupt_all()
        raise KeyboardInterrupt

    def not_beams_once_interrupted(record: logging.LogRecord) -> bool:
        return not (received and record.name.startswith("apache_beam"))

    handlers = list(logging.getLogger().handlers)
    previous: dict[int, object] = {}
    try:
        for handler in handlers:
            handler.addFilter(not_beams_once_interrupted)
        for s in SIGNALS:
            previous[s] = signal.signal(s, interrupt)
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        for handler in handlers:
            handler.removeFilter(not_beams_once_interrupted)


def temp_dirs(output: str) -> set[str]:
    """Beam's temporary write folders under a local `output` right now (none are looked for in a bucket: that
    would cost the launch a listing)."""
    if not is_local(output):
        return set()
    return set(glob.glob(os.path.join(os.path.expanduser(output), "beam-temp-*")))


def stop_after(signum: int, output: str, temp_before: set[str], error: BaseException,
               scratch: Sequence[str | None] = ()) -> None:
    """After the job unwound from signal `signum`: stops every engine, removes the temporary folders made since
    `temp_before` (and the `scratch` folders), says so in one line on stderr (with `error`'s first line when it is
    not the interrupt itself), and ends the process by the same signal. Exit handlers do not run (Beam's, for a
    local job server of a portable runner, included). Where a process cannot end by a signal it sends itself
    (PID 1 in a container), it exits with status 128 + signum."""
    close_all_engines()
    for folder in scratch:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    removed = sorted(temp_dirs(output) - temp_before)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    where = (f"removed {len(removed)} temporary folder(s) of unfinished writes under {output}" if is_local(output)
             else f"temporary folders under {output} (beam-temp-*) are left in place")
    print(f"beam_infer: stopped by {signal.Signals(signum).name}; {where}", file=sys.stderr)
    text = str(error).strip()
    if not isinstance(error, KeyboardInterrupt) and "KeyboardInterrupt" not in text:
        print(f"beam_infer: while stopping: {type(error).__name__}: {text.splitlines()[0] if text else ''}",
              file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1.0)  # the signal is delivered meanwhile; PID 1 ignores a default-action signal it sends itself
    os._exit(128 + signum)
