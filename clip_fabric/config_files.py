"""Checks on ``--config`` files before the parser reads them: a file past a size, or whose YAML aliases
expand past a number of values (an alias bomb, which takes gigabytes before any validation), is a one-line
error naming the file."""

from __future__ import annotations

import os

import yaml

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def check_config_files(argv: list[str]) -> None:
    """Raise ``ValueError`` naming a ``--config`` file of ``argv`` that is too large or expands too far."""
    for path in config_paths(argv):
        try:
            size = os.path.getsize(path)
        except OSError:
            continue  # the parser says the file is missing, in its own words
        if size > MAX_CONFIG_BYTES:
            raise ValueError(
                f"--config {path}: {size:,} bytes, over the {MAX_CONFIG_BYTES:,} a config may hold"
            )
        with open(path, "rb") as f:
            try:
                nodes = list(yaml.compose_all(f, Loader=yaml.SafeLoader))
            except yaml.YAMLError:
                continue  # a syntax error is the parser's to report
        if sum(_expanded(node, {}) for node in nodes if node is not None) > MAX_CONFIG_VALUES:
            raise ValueError(
                f"--config {path}: its YAML aliases expand to more than {MAX_CONFIG_VALUES:,} values: "
                "write the values out, or use fewer aliases"
            )


def config_paths(argv: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg[len("--config=") :])
    return paths


def _expanded(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values ``node`` holds once its aliases are expanded, counted without expanding them: an
    alias is the same node object, so each node's count is computed once."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = MAX_CONFIG_VALUES + 1  # a node that holds itself expands without end
    if isinstance(node, yaml.SequenceNode):
        count = 1 + sum(_expanded(item, seen) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        count = 1 + sum(_expanded(k, seen) + _expanded(v, seen) for k, v in node.value)
    else:
        count = 1
    seen[id(node)] = count
    return count
