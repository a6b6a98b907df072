"""Command-line errors as one line: what is wrong, the nearest option where a name was mistyped, and
where (the config file of a YAML error), instead of jsonargparse's usage dump with the error last.

Torch-free: only the parser's own ``argparse`` actions are read.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import NoReturn

from jsonargparse import ArgumentParser

from clip_fabric.config_files import config_paths

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_NOT_ACCEPTED = re.compile(r"(?:does not accept option|Key) ['\"]([\w.]+)['\"]")
_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")
_UNION = re.compile(
    r"Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors:.*Given value: (.*)"
)
_TYPE_NAME = re.compile(r"<class '(\w+)'>|typing\.Literal\[(.*?)\]")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)")
_YAML_STRING = '"<unicode string>"'


def prog() -> str:
    """The name a user typed: ``python -m clip_fabric`` rather than ``__main__.py``, or ``clip-fabric``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m clip_fabric" if name in ("", "__main__.py", "-c", "-m") else name


class OneLineErrorParser(ArgumentParser):
    """jsonargparse's parser, its errors printed as one ``clip_fabric: error:`` line (exit status 2)."""

    _argv: list[str] | None = None

    def parse_args(self, args: list[str] | None = None, *rest, **kwargs):
        self._argv = list(sys.argv[1:] if args is None else args)  # where a YAML error's file is named
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        line = one_line(
            message,
            option_names(parser),
            config_paths(self._argv if self._argv is not None else sys.argv[1:]),
        )
        sys.stderr.write(f"clip_fabric: error: {line} (see {parser.prog.replace(' [options]', '')} --help)\n")
        self.exit(2)


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` the parser knows, subcommands' included."""
    names = []
    for action in parser._actions:
        names += [s for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names += option_names(sub)
    return names


def nearest(name: str, names: list[str]) -> str | None:
    """The known name closest to a mistyped one, if any is close."""
    found = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return found[0] if found else None


def one_line(message: str, names: list[str], configs: list[str]) -> str:
    """jsonargparse's error ``message`` as one line, with the nearest option to a misspelt one and the
    config file a YAML error is in."""
    unknown = _UNRECOGNIZED.search(message)
    if unknown:
        option = unknown.group(1).split()[0].split("=")[0]
        guess = nearest(option, names) if option.startswith("--") else None
        hint = f": did you mean {guess}?" if guess else ""
        return f"unrecognized option {unknown.group(1)}{hint}"
    choice = _CHOICE.search(message)
    if choice:
        guess = nearest(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        message += f": did you mean {guess}?" if guess else ""
    key = _NOT_ACCEPTED.search(message)
    if key:
        guess = nearest(f"--{key.group(1)}", names)
        message += f": did you mean {guess.removeprefix('--')}?" if guess else ""
    literal = _LITERAL.search(message)
    if literal:  # a value not among the choices: name them plainly
        guess = nearest(literal.group(2).strip(), re.findall(r"'([^']*)'", literal.group(1)))
        hint = f": did you mean {guess}?" if guess else ""
        message = (
            f"{message[: literal.start()]}{literal.group(2).strip()!r} is not one of {literal.group(1)}{hint}"
        )
    message = " ".join(message.split())
    union = _UNION.search(message)
    if union:  # e.g. --data.batch_size abc: the accepted types, not the validation trace
        kinds = " or ".join(a or b for a, b in _TYPE_NAME.findall(union.group(1)))
        message = f"{message[: union.start()]}{union.group(2).strip()!r} is not {kinds}"
    message = _PARSER_KEY.sub(lambda m: f"--{m.group(1)}:", message)
    if _YAML_STRING in message and configs:
        message = message.replace(_YAML_STRING, configs[-1] if len(configs) == 1 else "a --config file")
    return message
