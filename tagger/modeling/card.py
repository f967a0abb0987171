"""Markdown tables of val metrics for MODEL_CARD.md: ``python -m tagger.modeling.card DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONDITIONS = ("clean", "grey", "lowres", "crop", "background")


def metrics_tables(metrics: dict) -> str:
    conds = [c for c in CONDITIONS if c in metrics]
    lines = ["| val condition | articleType F1 | baseColour F1 | gender F1 | usage F1 | articleType probe F1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in conds:
        rep = metrics[c]
        cell = lambda f: f"{rep[f]['f1']:.3f}" if f in rep else "n/a"  # noqa: E731
        lines.append(f"| {c} | {cell('type')} | {cell('colour')} | {cell('gender')} | {cell('usage')} | "
                     f"{cell('type_probe')} |")
    lines += ["", "| val condition | HITS@1 | HITS@5 | HITS@10 | MRR |", "| --- | ---: | ---: | ---: | ---: |"]
    for c in conds:
        r = metrics[c].get("retrieval")
        if r:
            lines.append(f"| {c} | {r['hits@1']:.3f} | {r['hits@5']:.3f} | {r['hits@10']:.3f} | {r['mrr']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(metrics_tables(json.loads((Path(sys.argv[1]) / "metrics.json").read_text())))
