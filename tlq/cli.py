"""The `tlq` command line. Each command lives in `tlq/commands/<name>.py` with a `register(app)`.

Errors the user can fix (`TLQError`) print one line and exit 2, never a traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer

from tlq.errors import TLQError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TLQ: quantize vision-language models with token-level importance, serve them with vLLM.")

# One module per command group, in the order `tlq --help` lists them.
COMMAND_MODULES = [
    "tlq.commands.fixture",
    "tlq.commands.calibrate",
    "tlq.commands.checkpoint",
    "tlq.commands.export",
    "tlq.commands.serve",
    "tlq.commands.lmms_task",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> None:
    # One intra-op thread per process is 5x faster on the 2-vCPU machines we measured;
    # TLQ_THREADS overrides. Must be set before torch spins up its pool.
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TLQ_THREADS", "1"))
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code != 0:  # typer.Exit(n) comes back as a return value here
            sys.exit(code)
    except TLQError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors carry their own exit code
        import click
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
