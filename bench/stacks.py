"""Summarise py-spy's collapsed stacks (``perf --profile``): where the CPU time went.

Usage: python -m bench.stacks FILE [--top 30] [--match TEXT]

Prints the functions with the most samples on the stack (inclusive) and at its top
(exclusive), as a share of all samples; ``--match`` keeps only stacks through a frame
containing TEXT.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def load(path: Path, match: str | None) -> list[tuple[list[str], int]]:
    """(frames, samples) per line of a collapsed-stacks file."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if match and not any(match in frame for frame in frames):
            continue
        stacks.append((frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int) -> str:
    """The top inclusive and exclusive frames."""
    total = sum(count for _, count in stacks) or 1
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    for frames, count in stacks:
        for frame in set(frames):
            inclusive[frame] += count
        exclusive[frames[-1]] += count
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "exclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in exclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match")
    args = parser.parse_args()
    print(summarise(load(args.file, args.match), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
