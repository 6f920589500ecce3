"""Rebuild ``next_line_mc.jsonl`` (the ``duo_shakespeare_next_line`` multiple-choice task) from the corpus.

Source: the held-out paragraphs of the built-in Shakespeare corpus (the last 2% of paragraphs, the validation split
of ``duo/tiny_cpu``, so a model trained with that config never saw them). Each item: ``context`` = one verse line,
``choices`` = the line that follows it and three other lines of the held-out text (seeded), ``label`` = the index
of the true line. Lines of fewer than 4 words are skipped. Run ``python build_next_line.py`` in this directory.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

OUT = Path(__file__).with_name("next_line_mc.jsonl")


def build(n_items: int = 150, seed: int = 0) -> list[dict]:
    from duo_plugin.data.corpora import shakespeare_documents

    paras = shakespeare_documents("paragraph")
    held = paras[len(paras) - math.ceil(0.02 * len(paras)):]
    pairs = []
    for p in held:
        lines = [ln.strip() for ln in p.splitlines() if ln.strip()]
        for a, b in zip(lines[:-1], lines[1:]):
            if len(a.split()) >= 4 and len(b.split()) >= 4:
                pairs.append((a, b))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pool = [b for _, b in pairs]
    items = []
    for a, b in pairs[:n_items]:
        wrong = []
        while len(wrong) < 3:
            c = rng.choice(pool)
            if c != b and c not in wrong:
                wrong.append(c)
        choices = wrong + [b]
        rng.shuffle(choices)
        items.append({"context": a, "choices": choices, "label": choices.index(b)})
    return items


if __name__ == "__main__":
    rows = build()
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} items to {OUT}")
