"""Sums a py-spy profile taken with --gil (samples of the thread holding the GIL) by where the time goes.

    py-spy record --gil -r 200 -f raw -o gil.raw -- python -m benchmarks.run ...
    python -m benchmarks.gil_profile gil.raw [--top 60]

Only the job counts: stacks under `run_job` (Beam's work and the DoFn, in the main thread) and the stacks of
other threads (the engine's), not the imports, model loads and bounds of the main thread before the job.
Prints two tables: samples by the innermost frame of this project's code (beam_infer, pipelines, benchmarks)
in each stack, with the library whose code ran below it (apache_beam, torch, PIL, ...), so a row says which of
our steps, and in which library, held the GIL; and samples by the innermost frame itself.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

OURS = ("beam_infer/", "pipelines/", "benchmarks/")


def parse(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) lines, `frame;frame;...;leaf count`, as (frames, count)."""
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


_INSTALLED = re.compile(r"(?:site-packages|dist-packages|lib/python3\.\d+)/(?:site-packages/|dist-packages/)?"
                        r"([^/:)]+)")


def _library(frame: str) -> str:
    path = frame.rpartition("(")[2]
    installed = _INSTALLED.search(path)
    name = installed.group(1) if installed else path.split("/", 1)[0]
    return name.split(".py")[0]


def _ours(frame: str) -> bool:
    return not _INSTALLED.search(frame) and any(mark in frame for mark in OURS)


def owner(frames: list[str]) -> str:
    """This project's innermost frame, with `→ library` when a library's code runs below it; else
    `library: innermost frame`."""
    for depth in range(len(frames) - 1, -1, -1):
        if _ours(frames[depth]):
            below = f" → {_library(frames[-1])}" if depth < len(frames) - 1 else ""
            return frames[depth] + below
    return f"{_library(frames[-1])}: {frames[-1]}" if frames else "?"


def in_job(frames: list[str]) -> bool:
    return bool(frames) and (frames[0].startswith("Thread._bootstrap") or any("run_job" in f for f in frames))


def summarise(stacks: list[tuple[list[str], int]], top: int) -> str:
    everything = sum(n for _, n in stacks)
    stacks = [(frames, n) for frames, n in stacks if in_job(frames)]
    total = sum(n for _, n in stacks) or 1
    by_owner: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    for frames, n in stacks:
        by_owner[owner(frames)] += n
        by_leaf[frames[-1]] += n
    lines = [f"{total} samples of the thread holding the GIL during the job ({everything} in all)", "",
             "by this project's innermost frame (else the library's):"]
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {k}" for k, n in by_owner.most_common(top)]
    lines += ["", "by innermost frame:"]
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {k}" for k, n in by_leaf.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args(argv)
    with open(args.raw) as f:
        print(summarise(parse(f), args.top))


if __name__ == "__main__":
    main(sys.argv[1:])
