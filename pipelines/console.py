"""What the command says on stderr besides progress and the summary: its logging (quiet by default, -v, -vv) and,
when the job fails, its first error, once, in place of Beam's stack of re-raised copies of it.
"""

from __future__ import annotations

import logging

_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def configure_logging(verbosity: int) -> None:
    """Warnings only by default; -v: beam_infer's (and this job's) info, -vv: their debug. Beam's loggers stay at
    warning, so its own chatter never drowns the job's. Without -v, a logged error carries no traceback, and
    Beam's error logs (a failing bundle, its own and those its workers relay: the job's failure says it once, at
    the end) are left out."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger()
    if not root.handlers:  # a launcher that set up logging itself (Airflow, a notebook) keeps its handlers
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if verbosity == 0:
            for handler in root.handlers:
                handler.addFilter(_without_tracebacks)
    root.setLevel(logging.WARNING)
    for name in ("beam_infer", "pipelines"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)


def _without_tracebacks(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.name.startswith("apache_beam.runners"):
        return False  # a bundle's failure, logged by Beam here and relayed from its workers: the job's error says it
    record.exc_info, record.exc_text = None, None
    return True


def first_error(error: BaseException) -> str:
    """The error that failed the job, without the copies Beam made of it: the exception of the first traceback a
    runner's message quotes (a worker's; Flink's and Spark's quote it mid-line, after "Error received from SDK
    harness …:"), else the exception's own text."""
    text = str(error).strip()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.endswith(_TRACEBACK):
            return _exception_after(lines[i + 1:]) or text
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def _exception_after(lines: list[str]) -> str | None:
    """The exception line that ends a traceback's frames (the first line not indented), with its message's other
    lines, up to a blank line or the next traceback."""
    for i, line in enumerate(lines):
        if line and not line[0].isspace():
            found = [line]
            for more in lines[i + 1:]:
                if not more.strip() or more.endswith(_TRACEBACK) or more.startswith(_CHAINED):
                    break
                found.append(more)
            return "\n".join(found)
    return None
