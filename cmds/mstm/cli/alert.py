"""mstm-alert: mail about problems (see mstm.alert and mstm.alert.mailer)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from mstm import config
from mstm.alert import (
    CursorStore,
    Follower,
    JournalSource,
    Postman,
    deliver_with_retries,
    failure_context,
    read_stdin,
    state_dir,
)
from mstm.alert.mailer import Mailer, MailError
from mstm.cli.common import CONTEXT_SETTINGS, common_options, run_command
from mstm.errors import EXIT_OK, EXIT_TEMPFAIL, ConfigError, TargetUnavailable
from mstm.runloop import stop_on_signals

log = logging.getLogger("mstm.alert")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("unit", required=False)
@click.option("--follow", is_flag=True,
              help="Read the journal until stopped; mail mstm's events at or above"
                   " [email] threshold, gathered for [logging] email_timer.")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Read events from stdin (JSON lines or log lines) until EOF and mail them.")
@click.option("--check", is_flag=True,
              help="Check [email], the password and the SMTP server (connect, TLS, login).")
@click.option("--dry-run", "-n", is_flag=True,
              help="With UNIT or --stdin: print the messages instead of sending them.")
@click.option("--lines", default=50, show_default=True, type=click.IntRange(1, 10000),
              help="With UNIT: how many of the failed run's last log lines to include.")
@click.option("--retry-for", default=60.0, show_default=True, type=click.FloatRange(0),
              help="With UNIT or --stdin: seconds to keep trying a mail server that is down"
                   " (what is still unsent waits in the outbox for the next run).")
@common_options
def main(unit: str | None, follow: bool, from_stdin: bool, check: bool, dry_run: bool,
         lines: int, retry_for: float, config_path: Path | None, verbose: int,
         quiet: bool) -> None:
    """Mail that UNIT failed (the OnFailure= handler), or mail mstm's events.

    Exit status: 0 mailed (or nothing to mail), 75 the mail server could not be
    reached (the mail waits in the outbox and is sent by the next run), 78 the
    configuration is wrong.
    """
    modes = [name for name, on in (("UNIT", unit is not None), ("--follow", follow),
                                   ("--stdin", from_stdin), ("--check", check)) if on]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of UNIT, --follow, --stdin, --check"
                               + (f" (got {', '.join(modes)})" if modes else ""))
    if dry_run and (follow or check):
        raise click.UsageError("--dry-run goes with UNIT or --stdin")

    def body() -> int:
        gcfg = config.load_global(config_path)
        email = gcfg.email
        if not email.recipient:
            if unit is not None:
                log.warning("%s failed, but [email] recipient is empty: nobody is told", unit)
                return EXIT_OK
            raise ConfigError("is empty: nobody to mail", file=str(gcfg.path),
                              section="email", key="recipient")
        mailer = None if dry_run else Mailer.from_config(email)
        if mailer is not None and check:
            return check_server(mailer, gcfg)
        postman = Postman(gcfg, mailer, dry_run=dry_run)
        if follow:
            return run_follow(gcfg, postman)
        if from_stdin:
            left = read_stdin(sys.stdin, gcfg, postman)
            left = deliver_with_retries(postman, retry_for) if left else 0
        else:
            assert unit is not None
            postman.post("failure", failure_context(unit, gcfg, lines))
            left = deliver_with_retries(postman, retry_for)
        if left:
            log.error("%d mail(s) not sent yet: they wait in %s for the next run",
                      left, postman.outbox.dir)
            return EXIT_TEMPFAIL
        return EXIT_OK

    run_command("mstm-alert", body, verbose=verbose, quiet=quiet)


def check_server(mailer: Mailer, gcfg: config.GlobalConfig) -> int:
    e = gcfg.email
    try:
        mailer.check()
    except MailError as err:
        raise TargetUnavailable(f"mail server {e.smarthost}:{e.port}: {err}") from None
    how = "TLS" if e.ssl else "STARTTLS" if e.starttls else "no TLS"
    who = f", logged in as {e.username}" if e.username else ""
    click.echo(f"{gcfg.path}: ok; mail server {e.smarthost}:{e.port} answers ({how}{who});"
               f" alerts go to {', '.join(e.recipient)}; state in {state_dir(e)}")
    return EXIT_OK


def run_follow(gcfg: config.GlobalConfig, postman: Postman) -> int:
    cursors = CursorStore(state_dir(gcfg.email))
    follower = Follower(gcfg, postman, JournalSource(cursors.load()), cursors)
    stop_on_signals(follower.loop.stop, doing="stopping", logger=log)
    follower.follow()
    return EXIT_OK
