"""What every mstm command shares: options, logging set-up and the error handler.

Each executable is a thin click command that calls into the modules named for what
they hold; this module turns known exceptions into one line on stderr and an exit code.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mstm import __version__
from mstm.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_TEMPFAIL, MstmError
from mstm.log import setup_logging

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

log = logging.getLogger("mstm")


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "-c",
        "config_path",
        # not click's own checks (exit 2, several lines): mstm.config reports a missing
        # file, a directory or a FIFO as a configuration error (exit 78, one line)
        type=click.Path(path_type=Path),
        envvar="MSTM_CONFIG",
        show_envvar=True,
        help="Global configuration file [default: /etc/mstm/global.ini].",
    )(func)


def verbosity_options(func: F) -> F:
    func = click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(func)
    return func


def common_options(func: F) -> F:
    func = config_option(func)
    func = verbosity_options(func)
    func = click.version_option(__version__, "-V", "--version", prog_name="mstm")(func)
    return func


def level_from_flags(verbose: int, quiet: bool) -> int:
    if quiet:
        return logging.WARNING
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1:
        return logging.INFO
    return logging.INFO


def run_command(tool: str, body: Callable[[], int | None], *, verbose: int = 0,
                quiet: bool = False) -> None:
    """Set up logging, run *body*, and turn its outcome into an exit code.

    Known errors print one line (``mstm-send: reason``) and exit with their code;
    anything unexpected is a bug: one line, exit 70, the traceback only with -vv.
    A configuration error (exit 78) is exactly one line, its hint included.
    """
    setup_logging(tool, level_from_flags(verbose, quiet))
    try:
        code = body()
    except MstmError as err:
        if err.exit_code == EXIT_CONFIG:
            _print_error(tool, _one_line(err.message, err.hint), None)
        else:
            _print_error(tool, err.message, err.hint)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as err:  # a bug: say so in one line, traceback on request
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            # a full disk (the spool's, typically) is no bug: a temporary failure
            _print_error(tool, str(err), "free some space; nothing was lost, run it again")
            sys.exit(EXIT_TEMPFAIL)
        log.debug("unexpected error", exc_info=True)
        _print_error(tool, f"internal error: {type(err).__name__}: {err}",
                     "run again with -vv for the traceback and report it")
        sys.exit(EXIT_SOFTWARE)
    sys.exit(code or 0)


def _one_line(message: str, hint: str | None) -> str:
    text = f"{message} (hint: {hint})" if hint else message
    return " ".join(text.split())  # no line breaks, whatever a reason quoted


def _print_error(tool: str, message: str, hint: str | None) -> None:
    click.echo(f"{tool}: {message}", err=True)
    if hint:
        click.echo(f"{tool}: hint: {hint}", err=True)
