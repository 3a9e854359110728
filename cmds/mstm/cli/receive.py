"""mstm-receive: the arrival monitor of a stream, on the target host."""

from __future__ import annotations

import json
import logging
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
from mstm.errors import EXIT_OK
from mstm.notify import Notifier
from mstm.overview.live import ReceiveReporter
from mstm.receive import Receiver, Settings
from mstm.runloop import stop_on_signals

log = logging.getLogger("mstm.receive")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("stream", required=False, shell_complete=complete_stream)
@click.option("--once", "mode", flag_value="once", default=True,
              help="Answer every complete control file present, then exit (the default).")
@click.option("--follow", "mode", flag_value="follow",
              help="Run until stopped: answer control and thank-you files as they arrive.")
@click.option("--json", "as_json", is_flag=True,
              help="With --once: print a JSON summary of what was answered.")
@click.option("--poll", "force_poll", is_flag=True,
              help="With --follow: poll every poll_interval instead of using inotify "
                   "(for file systems where inotify sees nothing, such as NFS).")
@click.option("--check", is_flag=True, help="Validate the configuration, then exit.")
@click.option("--status", "show_status", is_flag=True,
              help="Print the state of STREAM's receiving area (JSON), or without STREAM a"
                   " table of every area (with --json: one JSON document), then exit.")
@common_options
def main(stream: str | None, mode: str, as_json: bool, force_poll: bool, check: bool,
         show_status: bool,
         config_path: Path | None, verbose: int, quiet: bool) -> None:
    """Verify the batches senders put in STREAM's incoming area, publish them, answer.

    For each control file, every item's size and checksum are checked, good items are
    published atomically in the stream's directory, and a receipt says, per item: ok,
    bad-size, bad-checksum, missing, io-error or refused.  A thank-you file from the
    sender then removes the batch's files.  MiStaMover's handshake files are answered
    too.  Exit status: 0 done, 75 another mstm-receive is running for the stream,
    77 run as root on a spool another user owns, 78 the configuration is wrong.
    """

    if stream is None and not show_status:
        raise click.UsageError("missing argument STREAM (only --status may go without it)")

    def body() -> int:
        if stream is None:  # --status: every receiving area at a glance
            snaps = overview.all_areas(config_path)
            click.echo(overview.to_document("areas", snaps) if as_json
                       else overview.render_areas(snaps))
            return EXIT_OK
        cfg = config.load_stream(stream, config_path, role="receive")
        if show_status:  # read only
            click.echo(json.dumps(overview.checked_area_snapshot(cfg).to_json()))
            return EXIT_OK
        settings = Settings.from_config(cfg)
        if check:
            click.echo(f"{cfg.stream_file}: ok (receiving in {settings.incoming_dir},"
                       f" publishing in {settings.directory})")
            return EXIT_OK
        # it writes receive-state.json in the spool: as root, only in root's
        refuse_root_on_foreign_spool("mstm-receive", cfg.spool_dir)
        if not cfg.running:
            log.info("%s: status is %s in %s; nothing to do", cfg.name, cfg.status,
                     cfg.stream_file)
            return EXIT_OK
        receiver = Receiver(settings, notifier=Notifier(), force_poll=force_poll)
        stop_on_signals(receiver.stop, doing="finishing the current item", name=cfg.name,
                        logger=log)
        # totals and, when following, the metrics file (mstm.overview.live)
        receiver.on_pass = reporter = ReceiveReporter(cfg, metrics=mode == "follow")
        with receiver:
            if mode == "follow":
                receiver.follow()
                return EXIT_OK
            summary = receiver.run_once()
            reporter(summary)
        if as_json:
            click.echo(json.dumps({"stream": cfg.name, "batches": summary.batches,
                                   "ok": summary.ok, "failed": summary.failed,
                                   "bytes": summary.bytes, "thanked": summary.thanked,
                                   "quarantined": summary.quarantined,
                                   "deferred": summary.deferred,
                                   "statuses": summary.statuses}))
        log.info("%s: %d batch(es) answered: %d item(s) published (%d bytes), %d not;"
                 " %d acknowledged, %d quarantined", cfg.name, summary.batches, summary.ok,
                 summary.bytes, summary.failed, summary.thanked, summary.quarantined)
        return EXIT_OK

    run_command("mstm-receive", body, verbose=verbose, quiet=quiet)
