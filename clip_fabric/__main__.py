"""Command line: ``python -m clip_fabric COMMAND --config file.yaml --group.option value``.

Each command is a typed function; jsonargparse turns its signature and docstring into the CLI.
"""

from __future__ import annotations

import logging
import sys

from jsonargparse import CLI, set_parsing_settings

from clip_fabric import benchmark, doctor, evaluate, predict, verify_precision

COMMANDS = {
    "predict": predict.setup,
    "evaluate": evaluate.setup,
    "verify-precision": verify_precision.setup,
    "doctor": doctor.setup,
    "benchmark": benchmark.setup,
}


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clip_fabric").setLevel(logging.INFO)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text
    try:
        CLI(COMMANDS, args=args, as_positional=False)
    except (ValueError, RuntimeError) as err:
        # Configuration errors found after parsing (unknown model, unreadable source, ...): one line.
        sys.exit(f"clip_fabric: error: {err}")


if __name__ == "__main__":
    main()
