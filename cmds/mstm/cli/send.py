"""mstm-send: deliver a stream's ready items to its target, once or continuously."""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from pathlib import Path

import click

from mstm import config
from mstm.cli.common import CONTEXT_SETTINGS, common_options, run_command
from mstm.errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_TEMPFAIL
from mstm.log import under_journal
from mstm.notify import Notifier
from mstm.runloop import stop_on_signals
from mstm.send import Sender, TtyProgress
from mstm.spool import Spool
from mstm.transports import make_transport

log = logging.getLogger("mstm.send")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("stream")
@click.option("--once", "mode", flag_value="once", default=True,
              help="Scan, deliver everything ready, then exit (the default).")
@click.option("--follow", "mode", flag_value="follow",
              help="Run until stopped: deliver as items become ready.")
@click.option("--no-scan", is_flag=True,
              help="Only deliver what is already queued (a separate mstm-scan feeds the spool).")
@click.option("--json", "as_json", is_flag=True,
              help="With --once: print a JSON summary of what was delivered, skipped and failed.")
@click.option("--retry-failed", is_flag=True,
              help="Put items parked as failed back in the queue first.")
@click.option("--status", "show_status", is_flag=True,
              help="Print the stream's queue and state, then exit.")
@click.option("--check", is_flag=True, help="Validate the configuration, then exit.")
@click.option("--execute/--dry-run", "execute", default=None,
              help="Pull streams: fetch, or only show what would be fetched where.  On the"
                   " command line --once is a dry run unless --execute is given (like"
                   " mxsync); --follow and runs under systemd fetch.  Push streams: ignored.")
@common_options
def main(stream: str, mode: str, no_scan: bool, as_json: bool, retry_failed: bool,
         show_status: bool, check: bool, execute: bool | None, config_path: Path | None,
         verbose: int, quiet: bool) -> None:
    """Deliver the ready items of STREAM to its target and verify them there.

    Move mode deletes a source only after the target has reported the same size and
    sha256; mirror mode never deletes.  Exit status: 0 all delivered (or nothing to do),
    1 some items were parked as failed, 75 the target could not be reached, 78 the
    configuration is wrong.
    """

    def body() -> int:
        cfg = config.load_stream(stream, config_path)
        if check:
            click.echo(f"{cfg.stream_file}: ok")
            return EXIT_OK
        if cfg.direction == "pull":  # fetch from the remote host: mstm.pull
            from mstm import pull

            return pull.run_command(cfg, follow=mode == "follow", execute=execute,
                                    as_json=as_json, show_status=show_status,
                                    notifier=Notifier(),
                                    install_signals=partial(stop_on_signals, logger=log))
        spool = Spool(cfg.spool_dir, lease_seconds=cfg.outgoing.lease_seconds).open()
        if show_status:
            counts = spool.counts()
            state = spool.load_state().get("backoff", {})
            click.echo(json.dumps({"stream": cfg.name, "status": cfg.status, **counts,
                                   "backoff": state}))
            return EXIT_OK
        if retry_failed:
            n = spool.retry_failed()
            log.info("%s: %d failed item(s) queued again", cfg.name, n)
        if not cfg.running:
            log.info("%s: status is %s in %s; nothing to do", cfg.name, cfg.status,
                     cfg.stream_file)
            return EXIT_OK
        transport = make_transport(cfg, runtime_dir=cfg.runtime_dir)
        interactive = sys.stderr.isatty() and not as_json and not under_journal()
        sender = Sender(cfg, spool=spool, transport=transport, notifier=Notifier(),
                        progress=TtyProgress(cfg.name) if interactive and mode == "once" else None,
                        scan=not no_scan)
        stop_on_signals(sender.stop, name=cfg.name, logger=log)
        try:
            if mode == "follow":
                sender.follow()
                return EXIT_OK
            summary = sender.run_once()
        finally:
            transport.close()
            spool.close()
        if as_json:
            click.echo(summary.to_json())
        log.info("%s: %d delivered (%d bytes), %d failed, %d skipped, %d still queued%s",
                 cfg.name, len(summary.delivered), summary.bytes, len(summary.failed),
                 len(summary.skipped), summary.queued,
                 f"; paused: {summary.paused}" if summary.paused else "")
        if summary.failed:
            return EXIT_ITEMS_FAILED
        if summary.error and summary.queued:
            log.error("%s: target unreachable, %d item(s) still queued: %s", cfg.name,
                      summary.queued, summary.error)
            return EXIT_TEMPFAIL
        return EXIT_OK

    run_command("mstm-send", body, verbose=verbose, quiet=quiet)

