"""A sample's metadata beyond its key and caption: the fields of its ``.json``, as string columns.

Every value is a string (JSON text for numbers, booleans and lists: ``512``, ``true``, ``["a"]``), null
for JSON null, so that a field has one type in every row and every shard whatever the JSON holds; nested
objects are flattened to ``a.b`` keys as clip-retrieval flattens them.
"""

from __future__ import annotations

import json

# Columns clip_fabric writes itself: a .json field of the same name (img2dataset writes key and caption)
# keeps clip_fabric's value rather than replacing it.
OWN_COLUMNS = frozenset(
    {"key", "image_path", "caption", "similarity", "label", "probability", "topk_labels", "topk_probs"}
)


def json_fields(data: bytes) -> dict[str, str | None]:
    """The flattened fields of a ``.json`` object; raises ``ValueError`` on anything else."""
    value = json.loads(data.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    fields: dict[str, str | None] = {}
    _flatten(value, "", fields)
    return {name: text for name, text in fields.items() if name not in OWN_COLUMNS}


def _flatten(value: dict, prefix: str, into: dict[str, str | None]) -> None:
    for name, item in value.items():
        if isinstance(item, dict) and item:
            _flatten(item, f"{prefix}{name}.", into)
        elif item is None or isinstance(item, str):
            into[prefix + name] = item
        else:
            into[prefix + name] = json.dumps(item, ensure_ascii=False)


def text(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text, stripped; raises ``ValueError`` naming ``what`` where it is not UTF-8."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text ({err.reason} at byte {err.start})") from None
