"""Why samples were skipped, in a line: the most frequent reasons of a run folder's ``errors/`` with
their counts, so that "18 skipped samples" says what to fix without opening the parquet files.

Reasons that differ only in a file name, path or number (``no caption file img03.txt``, ``... img04.txt``)
count as one, shown by their first example. Torch-free.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter

SHOWN = 3  # reasons named in the final line
_VARYING = re.compile(r"\S*[/\\]\S*|\S+\.\w{1,5}\b|0x[0-9a-f]+|\d+")

log = logging.getLogger(__name__)


def count_reasons(reasons: list[str]) -> list[list]:
    """``[[example, count], ...]``, most frequent first (the first seen first among equals)."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for reason in reasons:
        kind = _VARYING.sub("#", str(reason))
        examples.setdefault(kind, str(reason))
        counts[kind] += 1
    return [[examples[kind], n] for kind, n in counts.most_common()]


def folder_reasons(fs, errors_dir: str) -> list[list]:  # noqa: ANN001 - an fsspec filesystem
    """``count_reasons`` of every ``errors/*.parquet`` of a run folder (none: an empty list)."""
    import pyarrow.parquet as pq

    try:
        paths = sorted(p for p in fs.ls(errors_dir, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
    reasons: list[str] = []
    for path in paths:
        if path.rsplit("/", 1)[-1].startswith("."):
            continue  # a temporary file of a write under way
        try:
            table = pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["reason"])
        except Exception as err:  # noqa: BLE001 - a file the summary cannot read must not lose the summary
            log.warning("error reasons: %s is unreadable (%s); its reasons are not counted", path, err)
            continue
        reasons += table.column("reason").to_pylist()
    return count_reasons(reasons)


def describe(reasons: list[list] | None, shown: int = SHOWN) -> str:
    """``18x no caption file img00.txt; 2x empty file; 1 other`` (empty without reasons)."""
    if not reasons:
        return ""
    parts = [f"{n}x {_short(example)}" for example, n in reasons[:shown]]
    rest = sum(n for _, n in reasons[shown:])
    if rest:
        parts.append(f"{rest} other{'s' if rest > 1 else ''}")
    return "; ".join(parts)


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
