"""mstm-send: deliver a stream's ready items to its target, once or continuously."""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from pathlib import Path

import click

from mstm import config, overview
from mstm.cli.common import (
    CONTEXT_SETTINGS,
    common_options,
    complete_stream,
    refuse_root_on_foreign_spool,
    run_command,
)
from mstm.errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_TEMPFAIL
from mstm.log import under_journal
from mstm.notify import Notifier
from mstm.overview.live import PullReporter, SendReporter
from mstm.pull.puller import Puller
from mstm.runloop import stop_on_signals
from mstm.sandbox import sandbox_warnings
from mstm.send import DEFAULT_MAX_WAIT, Sender, TtyProgress, queued_size
from mstm.spool import Spool
from mstm.transports import make_transport

log = logging.getLogger("mstm.send")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("stream", required=False, shell_complete=complete_stream)
@click.option("--once", "mode", flag_value="once", default=True,
              help="Scan, deliver everything ready, then exit (the default).")
@click.option("--follow", "mode", flag_value="follow",
              help="Run until stopped: deliver as items become ready.")
@click.option("--no-scan", is_flag=True,
              help="Only deliver what is already queued (a separate mstm-scan feeds the spool).")
@click.option("--json", "as_json", is_flag=True,
              help="With --once: print a JSON summary of what was delivered, skipped and failed.")
@click.option("--max-wait", type=click.FloatRange(min=0), default=DEFAULT_MAX_WAIT,
              show_default=True, metavar="SECONDS",
              help="With --once: sleep at most this long in all, waiting for retries or to"
                   " reconnect after a lost connection; what would need a longer wait stays"
                   " queued for the next run (exit 75).  A target that cannot be reached"
                   " at all is never waited for.")
@click.option("--retry-failed", is_flag=True,
              help="Put items parked as failed back in the queue first.")
@click.option("--status", "show_status", is_flag=True,
              help="Print the state of STREAM (JSON), or without STREAM a table of every"
                   " stream (with --json: one JSON document), then exit.")
@click.option("--check", is_flag=True, help="Validate the configuration, then exit.")
@click.option("--execute/--dry-run", "execute", default=None,
              help="Pull streams: fetch, or only show what would be fetched where.  On the"
                   " command line --once is a dry run unless --execute is given (like"
                   " mxsync); --follow and runs under systemd fetch.  Push streams: ignored.")
@common_options
def main(stream: str | None, mode: str, no_scan: bool, as_json: bool, max_wait: float,
         retry_failed: bool,
         show_status: bool, check: bool, execute: bool | None, config_path: Path | None,
         verbose: int, quiet: bool) -> None:
    """Deliver the ready items of STREAM to its target and verify them there.

    Move mode deletes a source only after the target has reported the same size and
    sha256; mirror mode never deletes.  Exit status: 0 all delivered (or nothing to do),
    1 some items were parked as failed, 75 the target could not be reached, 78 the
    configuration is wrong.
    """

    if stream is None and not show_status:
        raise click.UsageError("missing argument STREAM (only --status may go without it)")

    def body() -> int:
        if stream is None:  # --status: every stream at a glance
            snaps = overview.all_streams(config_path)
            click.echo(overview.to_document("streams", snaps) if as_json
                       else overview.render_streams(snaps))
            return EXIT_OK
        cfg = config.load_stream(stream, config_path)
        if show_status:  # read only: never opens the spool (no owner, no takeover)
            click.echo(json.dumps(overview.checked_stream_snapshot(cfg).to_json()))
            return EXIT_OK
        if check:
            click.echo(f"{cfg.stream_file}: ok")
            for warning in sandbox_warnings(cfg):  # exit 0 still: the file is right
                log.warning("%s", warning)
            return EXIT_OK
        if not show_status:
            refuse_root_on_foreign_spool("mstm-send", cfg.spool_dir)
        # the progress line: on a terminal only, not for --json nor the journal
        interactive = sys.stderr.isatty() and not as_json and not under_journal()
        if cfg.direction == "pull":  # fetch from the remote host: mstm.pull
            from mstm import pull

            return pull.run_command(cfg, follow=mode == "follow", execute=execute,
                                    as_json=as_json, show_status=show_status,
                                    notifier=Notifier(),
                                    install_signals=partial(stop_on_signals, logger=log),
                                    observe=partial(_observe_pull, cfg),
                                    progress=TtyProgress(cfg.name)
                                    if interactive and mode == "once" else None)
        spool = Spool(cfg.spool_dir, lease_seconds=cfg.outgoing.lease_seconds).open()
        if retry_failed:
            n = spool.retry_failed()
            log.info("%s: %d failed item(s) queued again", cfg.name, n)
        if not cfg.running:
            log.info("%s: status is %s in %s; nothing to do", cfg.name, cfg.status,
                     cfg.stream_file)
            return EXIT_OK
        transport = make_transport(cfg, runtime_dir=cfg.runtime_dir)
        sender = Sender(cfg, spool=spool, transport=transport, notifier=Notifier(),
                        progress=TtyProgress(cfg.name, queued=partial(queued_size, spool))
                        if interactive and mode == "once" else None,
                        scan=not no_scan)
        stop_on_signals(sender.stop, name=cfg.name, logger=log)
        # totals (state.json) and, when following, the metrics file (mstm.overview.live)
        sender.on_progress = reporter = SendReporter(cfg, sender, metrics=mode == "follow")
        try:
            if mode == "follow":
                sender.follow()
                return EXIT_OK
            summary = sender.run_once(max_wait=max_wait)
        finally:
            reporter.flush()
            transport.close()
            spool.close()
        if as_json:
            click.echo(summary.to_json())
        log.info("%s: %d delivered (%d bytes), %d failed, %d skipped, %d still queued%s%s",
                 cfg.name, len(summary.delivered), summary.bytes, len(summary.failed),
                 len(summary.skipped), summary.queued,
                 f", {summary.settling} not ready yet (settling, open for writing, or"
                 f" without their ready_marker)" if summary.settling else "",
                 f"; paused: {summary.paused}" if summary.paused else "")
        if summary.failed:
            return EXIT_ITEMS_FAILED
        if summary.error and summary.queued:
            log.error("%s: target unreachable, %d item(s) still queued: %s", cfg.name,
                      summary.queued, summary.error)
            return EXIT_TEMPFAIL
        if summary.waiting_retry and summary.queued:
            log.warning("%s: %d item(s) still queued; their next try is due past --max-wait"
                        " (%.0f s)", cfg.name, summary.queued, max_wait)
            return EXIT_TEMPFAIL
        return EXIT_OK

    run_command("mstm-send", body, verbose=verbose, quiet=quiet)


def _observe_pull(cfg: config.StreamConfig, puller: Puller) -> None:
    """Give a pull stream's Puller its metrics hook."""
    puller.on_cycle = PullReporter(cfg, puller)
