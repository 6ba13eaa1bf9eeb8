"""The files ``suggest`` writes: ``suggest.csv`` (rank, name, score, similarity when diverse,
per-class predicted area) and ``suggest.png``; written by ``pipelines.suggest``, read by the
report."""

from __future__ import annotations

import csv
from pathlib import Path

from ddpmseg.core.fileio import write_csv

SCORES = ("jsd", "entropy")  # what an image's score measures (the score_ column)
CSV_FILE = "suggest.csv"
SHEET_FILE = "suggest.png"


def write_suggestions(path: Path, rows: list[tuple], by: str, class_names: list[str],
                      diverse: bool) -> None:
    """``rows``: (name, score, similarity or None, per-class area) in rank order."""
    header = ["rank", "name", f"score_{by}"] + (["similarity"] if diverse else []) + \
        [f"area:{n}" for n in class_names]
    lines = [header]
    for rank, (name, score, similarity, area) in enumerate(rows, 1):
        sim = [] if not diverse else ["" if similarity is None else f"{similarity:.4f}"]
        lines.append([rank, name, f"{score:.6f}"] + sim + [f"{a:.4f}" for a in area])
    write_csv(path, lines)


def read_suggestions(folder) -> list[tuple[str, str, float]] | None:
    """(name, score kind, score) in rank order from ``folder/suggest.csv``, or None."""
    path = Path(folder) / CSV_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 3 or not header[2].startswith("score_"):
            return None
        kind = header[2][len("score_"):]
        return [(row[1], kind, float(row[2])) for row in reader if len(row) >= 3]
