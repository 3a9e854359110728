"""mstm-diskwatch: pause streams in priority order before a disk fills (see mstm.diskwatch)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import click

from mstm.cli.common import (
    CONTEXT_SETTINGS,
    common_options,
    refuse_root_on_foreign_spool,
    run_command,
)
from mstm.diskwatch import DiskWatch, Report, load_streams, status_line
from mstm.diskwatch.report import FsReport
from mstm.errors import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE
from mstm.overview.live import DiskReporter
from mstm.runloop import RunLoop, stop_on_signals

log = logging.getLogger("mstm.diskwatch")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--once", "mode", flag_value="once", default=True,
              help="Check every file system, act, print the levels, exit (the default).")
@click.option("--follow", "mode", flag_value="follow",
              help="Check every [disk_space_monitor] poll_interval until stopped.")
@click.option("--dry-run", "-n", is_flag=True,
              help="Say what would be stopped, resumed or deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the report as JSON.")
@common_options
def main(mode: str, dry_run: bool, as_json: bool, config_path: Path | None, verbose: int,
         quiet: bool) -> None:
    """Watch the free space of the file systems holding the streams' directories.

    Below level_low, streams with priority <= base_priority are paused (a stop file),
    lowest priority first; below level_vlow every stream there is, and streams with
    deletion_enabled lose items already delivered, oldest first.  Only stop files it
    placed itself are ever removed.  Exit status: 0 done, 70 some action failed,
    77 run as root on a spool_base_dir another user owns, 78 the configuration is
    wrong (the streams that load are still watched).
    """

    def body() -> int:
        gcfg, streams, problems = load_streams(config_path)
        if not dry_run:  # its state file is in spool_base_dir: as root, only in root's
            refuse_root_on_foreign_spool("mstm-diskwatch", gcfg.spool_base_dir)
        watch = DiskWatch(gcfg, streams, dry_run=dry_run)
        if mode == "follow":
            follow(watch, gcfg.disk_space_monitor.poll_interval,
                   metrics=DiskReporter(gcfg.metrics_dir))
            return EXIT_OK
        report = watch.check()
        click.echo(report.to_json() if as_json else render(report))
        if problems:
            return EXIT_CONFIG
        return EXIT_SOFTWARE if report.errors else EXIT_OK

    run_command("mstm-diskwatch", body, verbose=verbose, quiet=quiet)


def render(report: Report) -> str:
    lines = [a.describe() for a in report.actions]
    lines += [f"error: {e}" for e in report.errors]
    return "\n".join([*lines, report.table()])


def follow(watch: DiskWatch, interval: float, *,
           metrics: Callable[[list[FsReport]], None] | None = None) -> None:
    """Check every *interval* seconds until SIGTERM/SIGINT; tell systemd how it goes."""
    loop = RunLoop()
    stop_on_signals(loop.stop, doing="stopping", logger=log)
    first = True
    while not loop.stopping:
        try:
            report = watch.check()
            text = status_line(report)
            if metrics:
                metrics(report.filesystems)  # the levels, for an alert (mstm_disk_*)
        except OSError as e:  # a passing problem (a directory unmounted): try again later
            log.error("check failed: %s", e)
            text = f"check failed: {e}"
        if first:
            loop.notifier.ready(text)
            first = False
        else:
            loop.notifier.status(text)
        loop.tick()
        loop.sleep(interval)
    loop.notifier.stopping()
