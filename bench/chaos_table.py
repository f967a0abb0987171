"""Render out/chaos/results.jsonl (written by tests/chaos and bench/burst.py) as a Markdown table.

    python bench/chaos_table.py [results.jsonl] [--all]

By default only the latest run of each fault is shown; ``--all`` lists every run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent.parent / "out" / "chaos" / "results.jsonl"


def load(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def table(rows: list[dict], latest_only: bool = True) -> str:
    if latest_only:
        latest: dict[str, dict] = {}
        for row in rows:
            latest[row["fault"]] = row  # later lines win; insertion order keeps the first appearance
        rows = list(latest.values())
    out = ["| fault | events sent | ended correct | lost | time to recover |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        t = row.get("recovery_s")
        recover = "not recovered" if t is None or (isinstance(t, float) and math.isnan(t)) else f"{t:.1f} s"
        extra = f" ({row['events_per_s']} events/s)" if "events_per_s" in row else ""
        out.append(f"| {row['fault']} | {row['sent']:,} | {row['correct']:,} | {row['lost']:,} | {recover}{extra} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0]) if args else DEFAULT
    if not path.exists():
        print(f"no results at {path}; run: .venv/bin/python -m pytest -q tests/chaos", file=sys.stderr)
        return 1
    print(table(load(path), latest_only="--all" not in argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
