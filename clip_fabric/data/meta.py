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
    try:
        value = json.loads(data.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    fields: dict[str, str | None] = {}
    _flatten(value, "", fields)
    return {name: text for name, text in fields.items() if name not in OWN_COLUMNS}


def _flatten(value: dict, prefix: str, into: dict[str, str | None]) -> None:
    for name, item in value.items():
        key = writable(prefix + name)
        if isinstance(item, dict) and item:
            _flatten(item, f"{key}.", into)
            continue
        if key in into:  # {"a.b": 1, "a": {"b": 2}}: keeping one of them silently would lose the other
            raise ValueError(f"field {key!r} is given twice (as a dotted name and nested)")
        if item is None or isinstance(item, str):
            into[key] = item if item is None else writable(item)
        else:
            into[key] = writable(json.dumps(item, ensure_ascii=False))


def writable(value: str) -> str:
    """``value`` as text every writer takes: a name read from the disk or a tar that is not UTF-8
    (``caf\\xe9.jpg``, held by Python as a surrogate escape) or a lone surrogate from a ``.json``
    (``"\\ud800"``) is escaped with backslashes, visibly, instead of failing the shard's write."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def text(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text, stripped; raises ``ValueError`` naming ``what`` where it is not UTF-8."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text ({err.reason} at byte {err.start})") from None
