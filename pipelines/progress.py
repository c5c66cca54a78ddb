"""The job's live progress on stderr, from its engines' telemetry (beam_infer/monitor.py): records done / total,
records/s, ETA, dead letters and the stage that holds the job back right now. A tqdm bar on a terminal; a line
every --progress-every seconds otherwise (Airflow, CI). Only engines that can write into the launcher's
telemetry folder are seen (DirectRunner in every mode, a LOOPBACK environment); with none, nothing is shown.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from beam_infer import monitor
from beam_infer.io.fetch import is_local
from beam_infer.io.gcs_env import storage_options
from beam_infer.io.read import is_manifest, match_files

MODES = ("auto", "bar", "log", "off")
_BAR_REFRESH_S = 0.5
_RATE_WINDOW_S = 10.0  # records/s and the bottleneck are those of the last this many seconds
_COUNT_LINES_MAX_BYTES = 64 << 20  # a local CSV or JSON-lines manifest larger than this is not counted


def input_total(source: str | None, sample_size: int) -> int | None:
    """The records the read will produce when that is cheap to know, else None: the sample's size, a local
    glob's matches, a Parquet manifest's row count (its footer), a small local CSV or JSON-lines file's lines."""
    try:
        if source is None:
            return sample_size
        if not is_manifest(source):
            return sum(1 for _ in match_files(source)) if is_local(source) else None
        if source.lower().endswith(".parquet"):
            import fsspec
            import pyarrow.parquet as pq
            with fsspec.open(source, "rb", **storage_options(source)) as f:
                return pq.read_metadata(f).num_rows
        if is_local(source) and os.path.getsize(source) <= _COUNT_LINES_MAX_BYTES:
            with open(source, "rb") as f:
                lines = sum(1 for line in f if line.strip())
            return lines - 1 if source.lower().endswith(".csv") else lines  # the header
    except Exception:  # noqa: BLE001 - a count is a nicety; the read reports what is wrong with the input
        return None
    return None


class Progress:
    """While entered, a thread shows the progress of the engines writing into `telemetry_dir`.

    Args:
        mode: "bar" (tqdm), "log" (a line every `every_s`), "off", or "auto": a bar when `stream` is a terminal.
    """

    def __init__(self, telemetry_dir: str, total: int | None, mode: str = "auto", every_s: float = 10.0,
                 stream: TextIO | None = None) -> None:
        self._total = total
        self._stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self._stream.isatty() else "log"
        self._mode = mode
        self._every_s = every_s
        self._reader = monitor.TelemetryReader(telemetry_dir)
        self._stop = threading.Event()
        self._bar: tqdm | None = None
        self._lines = 0  # progress lines printed
        self._final: int | None = None  # records done by Beam's count, once the job has ended
        self._logging = logging_redirect_tqdm() if mode == "bar" else contextlib.nullcontext()
        self._thread = threading.Thread(target=self._loop, name="beam_infer-progress", daemon=True)
        self.start = time.time()

    def __enter__(self) -> Progress:
        self.start = time.time()
        if self._mode != "off":
            self._logging.__enter__()  # log lines go above the bar, not through it
            self._thread.start()
        return self

    def finish(self, records: int) -> None:
        """The job ended with `records` done by Beam's count (exact, where the telemetry's last samples may lag)."""
        self._final = records

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            if self._mode != "off":
                self._thread.join()
                if exc[0] is None:  # the job's end, by Beam's count where finish() gave it
                    self._show_end()
        finally:
            if self._mode != "off":
                self._logging.__exit__(*exc)
            if self._bar is not None:
                self._bar.close()

    def _show_end(self) -> None:
        try:
            logs = self._reader.read()
        except OSError:  # the progress is a nicety: the job has succeeded
            return
        if self._mode == "bar":
            self._show_bar(logs, time.time())
        elif self._lines and logs:  # a job that printed progress ends its lines at its end
            self._print(logs)

    def _loop(self) -> None:
        every = _BAR_REFRESH_S if self._mode == "bar" else self._every_s
        while not self._stop.wait(every):
            logs = self._reader.read()
            if not logs:
                continue
            if self._mode == "bar":
                self._show_bar(logs, time.time())
            else:
                self._print(logs)

    def _print(self, logs: list[monitor.EngineLog]) -> None:
        print(f"beam_infer: {self.line(logs, time.time())}", file=self._stream, flush=True)
        self._lines += 1

    def status(self, logs: list[monitor.EngineLog], now: float) -> tuple[int, int, float, str | None]:
        """(records done, dead letters, records/s and the bottleneck over the last few seconds)."""
        done = monitor.totals(logs)
        end = min(now, max(log.end for log in logs))  # totals stand still after an engine's last sample
        recent = monitor.window(logs, max(self.start, end - _RATE_WINDOW_S), end)
        records = self._final if self._final is not None else done["records"]
        return records, done["dead_letters"], recent.rate, recent.bottleneck()

    def line(self, logs: list[monitor.EngineLog], now: float) -> str:
        """"1,234 / 5,000 records (24.7%), 412.3 records/s, ETA 0:00:09, 3 dead letters, bottleneck: decode"."""
        done, dead, rate, bottleneck = self.status(logs, now)
        if self._total:
            left = max(0, self._total - done)
            eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 else "unknown"
            head = f"{done:,} / {self._total:,} records ({done / self._total:.1%}), {rate:,.1f} records/s, ETA {eta}"
        else:
            head = f"{done:,} records of an unknown total, {rate:,.1f} records/s"
        return f"{head}, {dead:,} dead letters, bottleneck: {bottleneck or 'unknown'}"

    def _show_bar(self, logs: list[monitor.EngineLog], now: float) -> None:
        if not logs:
            return
        done, dead, _, bottleneck = self.status(logs, now)
        if self._bar is None:
            self._bar = tqdm(total=self._total, unit=" records", file=self._stream, dynamic_ncols=True,
                             desc="beam_infer", mininterval=_BAR_REFRESH_S, miniters=1)
        self._bar.set_postfix_str(f"{dead:,} dead letters, bottleneck: {bottleneck or 'unknown'}", refresh=False)
        self._bar.update(done - self._bar.n)
        self._bar.refresh()  # the postfix too, when no record was done since the last look
