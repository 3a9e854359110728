"""mstm-send for a pull stream: the command line's body (status, dry run or execute,
once or follow)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import click

from mstm.config import StreamConfig
from mstm.errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE, die
from mstm.log import under_journal
from mstm.notify import Notifier
from mstm.pull.ledger import DONE, UNMAPPED, Ledger
from mstm.pull.planning import FAILED
from mstm.pull.puller import Puller
from mstm.pull.report import log_summary, render_plan
from mstm.send.report import TtyProgress

log = logging.getLogger("mstm.pull")


def run_command(stream: StreamConfig, *, follow: bool, execute: bool | None, as_json: bool,
                show_status: bool, notifier: Notifier | None = None,
                install_signals: Callable[[Callable[[], None]], None] | None = None,
                echo: Callable[[str], None] = click.echo,
                observe: Callable[[Puller], None] | None = None,
                progress: TtyProgress | None = None) -> int:
    """mstm-send for a pull stream; returns the exit status.  *observe* is given the
    Puller before it runs (the command line sets its metrics hook); *progress*, the
    terminal's progress line, is drawn by a --once that fetches."""
    if show_status:
        entries = Ledger(stream.pull.ledger or stream.spool_dir / "ledger.jsonl").read()
        echo(json.dumps({"stream": stream.name, "direction": "pull", "status": stream.status,
                         "ledger": str(stream.pull.ledger),
                         "done": sum(1 for e in entries.values() if e.state == DONE),
                         "unmapped": sum(1 for e in entries.values()
                                         if e.state == UNMAPPED)}))
        return EXIT_OK
    if not stream.running:
        log.info("%s: status is %s in %s; nothing to do", stream.name, stream.status,
                 stream.stream_file)
        return EXIT_OK
    if follow and execute is False:
        die("--follow always fetches; --dry-run goes with --once", code=EXIT_USAGE)
    # like mxsync, the command line only shows what it would do unless told --execute;
    # --follow and runs under systemd (the timer's mstm-send-once@) act
    acting = execute if execute is not None else (follow or under_journal())
    puller = Puller(stream, execute=acting, notifier=notifier)
    if install_signals:
        install_signals(puller.stop)
    if observe:
        observe(puller)
    if follow:
        puller.follow()
        return EXIT_OK
    if acting and not follow:
        puller.progress = progress
    try:
        report = puller.cycle()
    finally:
        if puller.progress:
            puller.progress.finish()
        puller.close()
    if as_json:
        echo(report.to_json())
    elif not acting:
        echo(render_plan(report))
    if acting:
        log_summary(report)
    if report.results(FAILED):
        return EXIT_ITEMS_FAILED
    return EXIT_OK
