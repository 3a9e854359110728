"""mstm-scan: find a stream's ready items and queue them (or print them)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from mstm import config
from mstm import scan as scanning
from mstm.cli.common import (
    CONTEXT_SETTINGS,
    common_options,
    complete_stream,
    refuse_root_on_foreign_spool,
    run_command,
)
from mstm.errors import EXIT_OK, EXIT_USAGE, die
from mstm.runloop import RunLoop, stop_on_signals
from mstm.spool import Spool, SpoolBusy, item_id

log = logging.getLogger("mstm.scan")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("stream", shell_complete=complete_stream)
@click.option("--once", "mode", flag_value="once", default=True,
              help="Scan once and exit (the default).")
@click.option("--follow", "mode", flag_value="follow",
              help="Keep watching (inotify, or polling where inotify cannot work).")
@click.option("--print", "print_nl", is_flag=True,
              help="Write ready paths to stdout, one per line, instead of queueing them.")
@click.option("-0", "--print0", "print0", is_flag=True,
              help="Like --print, but NUL-terminated (safe for any file name).")
@click.option("--check", is_flag=True, help="Validate the configuration, then exit.")
@common_options
def main(stream: str, mode: str, print_nl: bool, print0: bool, check: bool,
         config_path: Path | None, verbose: int, quiet: bool) -> None:
    """Find the items of STREAM that are ready to send and queue them in its spool.

    Ready means: not a dot-file nor matching ignore_patterns; unchanged (mtime and
    ctime) for settle_seconds; not open for writing by any process on this host; and its
    ready_marker present, if one is configured.  In move mode, a ready item whose id
    (path, size, mtime) was delivered before is queued again: a scan never deletes.
    """

    def body() -> int:
        cfg = config.load_stream(stream, config_path)
        if check:
            click.echo(f"{cfg.stream_file}: ok")
            return EXIT_OK
        if cfg.direction == "pull":
            die(f"{stream} is a pull stream ({cfg.stream_file}): mstm-send lists and fetches "
                f"its remote items itself; there is nothing local to scan", code=EXIT_USAGE)
        printing = print_nl or print0
        if not printing:  # --print only reads
            refuse_root_on_foreign_spool("mstm-scan", cfg.spool_dir)
        spool = None if printing else Spool(cfg.spool_dir,
                                            lease_seconds=cfg.outgoing.lease_seconds).open()
        printed: set[str] = set()
        out = sys.stdout.buffer

        def one_pass() -> scanning.ScanReport:
            if printing:
                report = scanning.scan(cfg)
                end = b"\0" if print0 else b"\n"
                for c in report.ready:
                    rid = item_id(c.relpath, c.size, c.mtime_ns)
                    if rid in printed:
                        continue
                    printed.add(rid)
                    out.write(os.path.join(os.fsencode(cfg.directory), os.fsencode(c.relpath))
                              + end)
                out.flush()
                return report
            assert spool is not None
            return scanning.scan_and_queue(cfg, spool)

        def locked_pass() -> scanning.ScanReport | None:
            if spool is None:
                return one_pass()
            try:
                with spool.scan_lock():
                    return one_pass()
            except SpoolBusy:
                log.warning("%s: another mstm-scan holds the spool; not scanning", cfg.name)
                return None

        if mode == "once":
            report = locked_pass()
            if report is not None and not printing:
                log.info("%s: %d ready, %d still settling", cfg.name, len(report.ready),
                         report.waiting)
            return EXIT_OK

        from mstm.watch import Watcher

        watcher = Watcher(cfg.directory, poll_interval=cfg.poll_interval, recursive=True)
        loop = RunLoop()
        notifier = loop.notifier
        loop.on_stop(watcher.wake)
        stop_on_signals(loop.stop, doing="stopping", name=cfg.name, logger=log)
        notifier.ready(f"watching {cfg.directory}")
        try:
            while not loop.stopping:
                loop.tick()
                report = locked_pass()
                timeouts = [cfg.poll_interval * 20]
                if notifier.max_sleep:
                    timeouts.append(notifier.max_sleep)
                if report is None:
                    timeouts.append(cfg.poll_interval)
                elif report.next_check is not None:
                    timeouts.append(report.next_check + 0.05)
                watcher.wait(max(0.0, min(timeouts)))
        finally:
            notifier.stopping()
            watcher.close()
        return EXIT_OK

    run_command("mstm-scan", body, verbose=verbose, quiet=quiet)
