"""What every mstm command shares: options, logging set-up and the error handler.

Each executable is a thin click command that calls into the modules named for what
they hold; this module turns known exceptions into one line on stderr and an exit code.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mstm import __version__, config
from mstm.errors import EXIT_CONFIG, EXIT_NOPERM, EXIT_SOFTWARE, EXIT_TEMPFAIL, MstmError
from mstm.log import VERBOSE, event, setup_logging, under_journal

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


def complete_stream(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of a STREAM argument: the names in [global] data_stream_list of
    the global file (--config, $MSTM_CONFIG or /etc/mstm/global.ini); none if it cannot
    be read.  Never a message: it runs at each press of TAB."""
    try:
        logging.getLogger("mstm.config").disabled = True
        names = config.load_global(ctx.params.get("config_path")).data_stream_list
    except Exception:
        return []
    return [n for n in names if n.startswith(incomplete)]


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
        return VERBOSE  # mstm-send: one line per delivered item
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
            _print_error(tool, _one_line(err.message, err.hint), None, err.exit_code)
        else:
            _print_error(tool, err.message, err.hint, err.exit_code)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as err:  # a bug: say so in one line, traceback on request
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            # a full disk (the spool's, typically) is no bug: a temporary failure
            _print_error(tool, str(err), "free some space; nothing was lost, run it again",
                         EXIT_TEMPFAIL)
            sys.exit(EXIT_TEMPFAIL)
        log.debug("unexpected error", exc_info=True)
        _print_error(tool, f"internal error: {type(err).__name__}: {err}",
                     "run again with -vv for the traceback and report it", EXIT_SOFTWARE)
        sys.exit(EXIT_SOFTWARE)
    sys.exit(code or 0)


def _one_line(message: str, hint: str | None) -> str:
    text = f"{message} (hint: {hint})" if hint else message
    return " ".join(text.split())  # no line breaks, whatever a reason quoted


def _print_error(tool: str, message: str, hint: str | None, code: int | None = None) -> None:
    """The one line of an error that ends the command: on stderr, or under systemd into
    the journal at priority err (stderr lines would land there at info, invisible to
    ``journalctl -p warning``), with MSTM_EXIT_CODE (event "fatal")."""
    if under_journal():
        text = f"{message} (hint: {hint})" if hint else message
        try:
            log.error("%s", text, extra=event("fatal", reason=message, exit_code=code))
            return
        except Exception:  # the error must be told, one way or the other
            pass
    click.echo(f"{tool}: {message}", err=True)
    if hint:
        click.echo(f"{tool}: hint: {hint}", err=True)


def refuse_root_on_foreign_spool(tool: str, spool_dir: Path) -> None:
    """Run as root, refuse to write a spool that belongs to another user (exit 77).

    Records root wrote there would belong to root, and the service, running as the
    spool's owner (user mstm), could then not read or move them.  The spool's directory,
    or the base directory it will be created in, decides.  Commands that only read
    (--status, --check) do not call this.
    """
    if os.geteuid() != 0:
        return
    for where in (spool_dir, spool_dir.parent):
        try:
            uid = where.stat().st_uid
        except OSError:
            continue
        if uid == 0:
            return
        try:
            owner, how = pwd.getpwuid(uid).pw_name, ""
        except KeyError:
            owner, how = f"uid {uid}", f"#{uid}"
        again = shlex.join([tool, *sys.argv[1:]])
        runas = (f"runuser -u {owner} -- {again}" if not how
                 else f"setpriv --reuid={uid} --regid={where.stat().st_gid} --clear-groups"
                      f" -- {again}")
        err = MstmError(f"{where} belongs to {owner}, not root: run as root, this command would"
                        f" leave files there that {owner} (the service) cannot read; nothing"
                        " was changed", hint=f"run it as that user: {runas}")
        err.exit_code = EXIT_NOPERM
        raise err
