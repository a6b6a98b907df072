"""Command line: ``python -m clip_fabric COMMAND --config file.yaml --group.option value``.

Each command is a typed function; jsonargparse turns its signature and docstring into the CLI. Exit
status: 0 done, 1 a one-line error, 2 a command-line error; ``predict`` also 3 (nothing embedded) and
75 (shards left: rerun to resume), see docs/reliability.md.
"""

from __future__ import annotations

import atexit
import gc
import logging
import sys

from jsonargparse import CLI, set_parsing_settings

from clip_fabric import benchmark, doctor, evaluate, predict, verify_precision
from clip_fabric.config_files import check_config_files
from clip_fabric.preemption import stops_end_cleanly
from clip_fabric.run_folder import exit_status

COMMANDS = {
    "predict": predict.setup,
    "evaluate": evaluate.setup,
    "verify-precision": verify_precision.setup,
    "doctor": doctor.setup,
    "benchmark": benchmark.setup,
}


@stops_end_cleanly  # SIGTERM, SIGUSR1 or Ctrl-C in set-up: one line and exit 75, as in the loop
def main(args: list[str] | None = None) -> None:
    # Exit without the final garbage collection over every object torch and open_clip made: about a
    # second of a short run, for nothing (docs/startup.md).
    atexit.unregister(gc.freeze)  # once, however often main runs in one process (the tests)
    atexit.register(gc.freeze)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clip_fabric").setLevel(logging.INFO)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text
    try:
        check_config_files(sys.argv[1:] if args is None else args)  # an alias bomb: before the parser
        from clip_fabric import cli  # torch-free

        parser = {"parser_class": cli.OneLineErrorParser, "prog": cli.prog()}  # errors: one line
        result = CLI(COMMANDS, args=args, as_positional=False, **parser)
    except (ValueError, RuntimeError, OSError) as err:
        # Configuration errors found after parsing (unknown model, unreadable source, ...) and a full
        # disk or unwritable output: one line.
        sys.exit(f"clip_fabric: error: {err}")
    if _command(args) == "predict" and isinstance(result, dict) and _global_rank() == 0:
        code, message = exit_status(result)
        if code:
            print(f"clip_fabric: {message}", file=sys.stderr)
            sys.exit(code)


def _command(args: list[str] | None) -> str | None:
    return next((a for a in (sys.argv[1:] if args is None else args) if a in COMMANDS), None)


def _global_rank() -> int:
    """Only rank 0 exits with predict's status: every rank holds the same summary, and a rank that
    exits non-zero first makes Fabric's launcher (or ``srun --kill-on-bad-exit``) kill rank 0 before
    it has written summary.json or asked SLURM to requeue the job."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


if __name__ == "__main__":
    main()
