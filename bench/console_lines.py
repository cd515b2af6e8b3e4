"""What a command printed on the terminal: lines, progress-bar lines and framework lines.

    make demo > demo.out 2> demo.err; .venv/bin/python bench/console_lines.py demo.out demo.err

A terminal line is one newline-terminated line of the captured stdout / stderr; a tqdm bar redrawn in place
(carriage returns) is one line, and a bar that a Ray worker's output forwarding turned into one line per
redraw is as many lines as it printed. Bar lines are those whose last redraw is a tqdm bar (`NN%|`); the
others are split into ecgray's own (the demo's stage lines `== ...`, its report, `ecgray ...` lines) and
everything else, counted by source (the `(Actor pid=N)` prefix Ray puts on a worker's line, or the line's
first words). Prints the counts; the last line is `console lines: <total>, bars: <n>, other: <n>`.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

BAR = re.compile(r"\d+%\|")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WORKER = re.compile(r"^\(([^\s()]+) pid=\d+(?:, ip=[\d.]+)?\)")


def classify(lines: list[str]) -> tuple[int, collections.Counter, collections.Counter]:
    """-> (bar lines, bar lines by description, other lines by source)."""
    bars, by_bar, other = 0, collections.Counter(), collections.Counter()
    for line in lines:
        last = ANSI.sub("", line.split("\r")[-1])
        if BAR.search(last):
            bars += 1
            by_bar[WORKER.sub("", last).strip().split(":")[0][:50]] += 1
            continue
        worker = WORKER.match(last)
        other[f"({worker.group(1)})" if worker else " ".join(last.split()[:2])[:40] or "<blank>"] += 1
    return bars, by_bar, other


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="captured stdout / stderr of one command")
    parser.add_argument("--top", type=int, default=12, help="sources listed")
    args = parser.parse_args()
    lines: list[str] = []
    for name in args.files:
        text = Path(name).read_bytes().decode("utf-8", errors="replace")  # keeps a bar's \r redraws
        lines += text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    bars, by_bar, other = classify(lines)
    print("bar lines by bar:")
    for key, n in by_bar.most_common(args.top):
        print(f"  {n:6d}  {key}")
    print("other lines by source:")
    for key, n in other.most_common(args.top):
        print(f"  {n:6d}  {key}")
    print(f"console lines: {len(lines)}, bars: {bars}, other: {len(lines) - bars}")


if __name__ == "__main__":
    main()
