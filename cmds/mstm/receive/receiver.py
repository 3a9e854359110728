"""The Receiver: its life cycle, one pass over I, --once and --follow, and mstm's own
handshake files.

A pass lists I once and handles every thank-you file, then every control file, each in
:meth:`Receiver._guard`: a control file without a receipt is answered (its items by
:class:`~mstm.receive.batch.Publisher`, then the receipt is written: temp name, fsync,
rename, fsync of I), a thank-you removes its batch's control file, receipt and directory,
by names derived from the batch name only.  Names starting with "." are MiStaMover's
(:mod:`mstm.receive.mistamover`).  Between two batches come the housekeeping tasks
(:mod:`mstm.receive.cleanup`, :mod:`mstm.receive.abandoned`).

Crash safety: every step is a rename or is repeated.  A receiver killed at any instant
and restarted finds the control file without a receipt and processes it again (see
:mod:`mstm.receive.batch`); leftovers are removed at start-up.

Hostile input: control and thank-you files are size-limited and parsed strictly
(:mod:`mstm.protocol`); one that fails is moved to ``I/.quarantine/`` with a warning.
Any other error while a handshake file is handled (a bug, or an input nobody foresaw)
is logged with its traceback, and the file and its batch directory are moved to
``I/.quarantine/``: nothing is deleted, and the other batches go on being answered.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress

from mstm import protocol
from mstm.errors import ConfigError, MstmError
from mstm.log import fields, show
from mstm.notify import Notifier
from mstm.protocol import Control, ProtocolError, Status
from mstm.receive.abandoned import AbandonedBatches
from mstm.receive.areas import QUARANTINE, REFUSING, Areas, BadHandshake, write_atomic
from mstm.receive.batch import Job, Publisher, Result, Stopped
from mstm.receive.cleanup import Cleanup, WarnOnce, housekeeping
from mstm.receive.mistamover import MiStaMover
from mstm.receive.settings import Settings, Summary
from mstm.runloop import RunLoop
from mstm.safefs import DIR_FLAGS, open_dir
from mstm.watch import Watcher

log = logging.getLogger("mstm.receive")

RESCAN_SECONDS = 60.0  # with inotify: look anyway this often
EXPIRY_CHECK_SECONDS = 60.0  # expiry and crash leftovers: at most this often
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Receiver:
    """Answers the control and thank-you files of one receiving stream."""

    def __init__(self, settings: Settings, *, notifier: Notifier | None = None,
                 force_poll: bool = False) -> None:
        self.s = settings
        self.loop = RunLoop(notifier)
        self.notifier = self.loop.notifier
        self.force_poll = force_poll
        self._watcher: Watcher | None = None
        self.areas = Areas(settings)
        self.publisher = Publisher(self.areas, self.loop)
        self.mistamover = MiStaMover(self.areas, self.publisher)
        warn_once = WarnOnce(settings.stream)
        self.cleanup = Cleanup(self.areas, self.loop, warn_once)
        self.abandoned = AbandonedBatches(self.areas, self.loop, warn_once)
        self._last_expiry = 0.0
        self.total = Summary()
        # called after each pass of follow() with what it did (the command line sets
        # it: totals and the metrics file, mstm.overview.live)
        self.on_pass: Callable[[Summary], float | None] | None = None
        for ext in (settings.control_ext, settings.receipt_ext, settings.thanks_ext):
            try:
                protocol.check_extension(ext)
            except ProtocolError as err:
                raise ConfigError(str(err), section="incoming") from None

    # ------------------------------------------------------------------ life cycle

    def open(self) -> Receiver:
        """Open (and make) the directories, take the stream's lock, clean up after a
        crash.  ConfigError or AlreadyRunning if that cannot be done."""
        try:
            self.areas.open()
            names = self.areas.listdir()
            self.abandoned.remove_set_aside(names)
            self.cleanup.leftovers(names)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.areas.close()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def __enter__(self) -> Receiver:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Finish the current item, then return from run_once() or follow().  Thread- and
        signal-safe."""
        self.loop.stop()

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    # ------------------------------------------------------------------ main loops

    def run_once(self) -> Summary:
        """Answer every complete control file (and thank-you) present now."""
        summary = Summary()
        self._pass(summary)
        return summary

    def follow(self) -> None:
        """Answer control and thank-you files as they arrive, until stop()."""
        s = self.s
        # a control file starts a pass at once: its sender waits for the receipt
        self._watcher = Watcher(s.incoming_dir, poll_interval=s.poll_interval,
                                recursive=False, force_poll=self.force_poll,
                                urgent_suffixes=("." + s.control_ext,))
        forget_waker = self.loop.on_stop(self._watcher.wake)
        log.info("%s: receiving in %s, publishing in %s (%s)", s.stream, s.incoming_dir,
                 s.directory, self._watcher.backend)
        self.notifier.ready(f"{s.stream}: waiting for batches")
        try:
            while not self.stopping:
                summary = Summary()
                next_due = self._pass(summary)
                self.loop.tick()
                wake = self.on_pass(summary) if self.on_pass else None
                t = self.total
                self.notifier.status(f"{s.stream}: {t.batches} batches answered, {t.ok}"
                                     f" items published, {t.failed} not")
                if self.stopping:
                    break
                # not loop.max_wait(): without an event, one look at I a minute is enough
                timeout = RESCAN_SECONDS
                if next_due is not None:
                    timeout = min(timeout, max(0.05, next_due))
                if wake is not None:  # a change the metrics file held back
                    timeout = min(timeout, wake + 0.01)
                if self.notifier.max_sleep is not None:
                    timeout = min(timeout, self.notifier.max_sleep)
                self._watcher.wait(timeout)
        finally:
            forget_waker()
        self.notifier.stopping(f"{s.stream}: stopping")
        log.info("%s: stopped", s.stream)

    def _pass(self, summary: Summary) -> float | None:
        """One look at I; returns in how many seconds something deferred is due."""
        areas = self.areas
        names = areas.listdir()
        present = set(names)
        areas.broken &= present
        s = self.s
        due: float | None = None
        for name in sorted(n for n in names if n.endswith("." + s.thanks_ext)):
            if self.stopping:
                return None
            if name not in areas.broken:
                self._guard(name, summary, self._on_thanks)
        for name in sorted(n for n in names if n.endswith("." + s.control_ext)):
            if self.stopping:
                return None
            if name in areas.broken:
                continue
            wait = self._guard(name, summary, self._on_control)
            if wait is not None:
                due = wait if due is None else min(due, wait)
        now = time.monotonic()
        if now - self._last_expiry >= EXPIRY_CHECK_SECONDS:
            self._last_expiry = now
            areas.broken.clear()  # try those again once a minute
            housekeeping(s.stream, "expire", self.cleanup.expire, areas.listdir())
            housekeeping(s.stream, "clean_leftovers", self.cleanup.leftovers,
                         areas.listdir())
        wait = self.abandoned.look_if_due(names, summary, now)
        if wait is not None:
            due = wait if due is None else min(due, wait)
        self.total.merge(summary)
        self.total.batches += summary.batches
        self.total.thanked += summary.thanked
        self.total.quarantined += summary.quarantined
        self.total.abandoned += summary.abandoned
        return due

    def _guard(self, name: str, summary: Summary,
               handler: Callable[[str, Summary], float | None]) -> float | None:
        """Run *handler* on one handshake file; a bad one is quarantined, never fatal."""
        try:
            return handler(name, summary)
        except Stopped:
            return None
        except BadHandshake as bad:
            if self.areas.quarantine(name, str(bad)):
                summary.quarantined += 1
        except OSError as err:  # the incoming area itself misbehaves: log, try again later
            log.warning("%s: %s: %s", self.s.stream, show(name), err,
                        extra=fields(stream=self.s.stream, item=name, result="io-error",
                                     reason=str(err)))
        except MstmError:  # our own areas are unusable (not this batch's fault)
            raise
        except Exception as err:  # a bug, or an input nobody foresaw: never fatal
            reason = f"internal error: {type(err).__name__}: {err}"
            log.error("%s: %s: %s; set aside in %s", self.s.stream, show(name), reason,
                      QUARANTINE, exc_info=True,
                      extra=fields(stream=self.s.stream, item=name, result="quarantined",
                                   reason=reason))
            self._set_aside(name, reason, summary)
        return None

    def _set_aside(self, name: str, reason: str, summary: Summary) -> None:
        """Quarantine the handshake file *name* whose handling failed, and the directory
        of its batch (nothing is deleted: the other batches go on being served)."""
        areas = self.areas
        with suppress(OSError):  # whatever we held for it
            areas.release_stage_root()
        if areas.quarantine(name, reason):
            summary.quarantined += 1
        stems = [name[: -len(ext) - 1] for ext in (self.s.control_ext, self.s.thanks_ext)
                 if name.endswith("." + ext)]
        stem = stems[0] if stems else ""
        if protocol.BATCH_RE.match(stem) and areas.exists(stem) is not None:
            if areas.quarantine(stem, f"its {name} could not be handled"):
                summary.quarantined += 1

    # ------------------------------------------------------------------ handshake files

    def _on_thanks(self, name: str, summary: Summary) -> float | None:
        s = self.s
        stem = name[: -len(s.thanks_ext) - 1]
        if protocol.BATCH_RE.match(stem):
            data = self.areas.read(name, protocol.MAX_THANKS_BYTES)
            if data is None:
                return None
            try:
                protocol.parse_thanks(data, batch=stem)
            except ProtocolError as err:
                raise BadHandshake(str(err)) from None
            self.areas.remove_batch(stem)
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.areas.i_fd)
            summary.thanked += 1
            log.info("%s: batch %s acknowledged, cleaned up", s.stream, stem)
            return None
        if stem.startswith("."):
            return self.mistamover.on_thanks(name, summary)
        raise BadHandshake("not a thank-you file name (<batch>.<extension>)")

    def _on_control(self, name: str, summary: Summary) -> float | None:
        s = self.s
        stem = name[: -len(s.control_ext) - 1]
        if stem.startswith("."):
            return self.mistamover.on_control(name, summary)
        if not protocol.BATCH_RE.match(stem):
            raise BadHandshake("not a control file name (<batch>.<extension>)")
        receipt_name = f"{stem}.{s.receipt_ext}"
        if self.areas.exists(receipt_name) is not None:
            return None  # answered; waiting for the thank-you
        data = self.areas.read(name, s.max_control_bytes)
        if data is None:
            return None
        try:
            control = protocol.parse_control(data, receipt_ext=s.receipt_ext,
                                              max_bytes=s.max_control_bytes)
        except ProtocolError as err:
            raise BadHandshake(str(err)) from None
        if control.batch != stem:
            raise BadHandshake(f"names batch {control.batch}, but is {name}")
        self._answer(control, summary)
        return None

    def _answer(self, control: Control, summary: Summary) -> None:
        """Receive the batch's items and directories into D, then write its receipt."""
        s, areas = self.s, self.areas
        batch = control.batch
        t0 = time.monotonic()
        try:
            source_fd: int | None = os.open(batch, DIR_FLAGS, dir_fd=areas.i_fd)
        except OSError as err:
            if err.errno not in (errno.ENOENT, *REFUSING):
                raise
            source_fd = None
            if err.errno != errno.ENOENT:
                log.warning("%s: batch %s: its directory is a symbolic link or not a"
                            " directory", s.stream, batch)
        job = Job(label=f"batch {batch}", key=batch, algorithm=control.algorithm,
                  source_fd=source_fd,
                  source_refused=source_fd is None and areas.exists(batch) is not None)
        batch_summary = Summary()
        try:
            try:
                job.stage_fd = open_dir([job.key], areas.open_stage_root(), create=True,
                                        mode=0o700)
            except (OSError, MstmError) as err:
                cause = err.__context__ if isinstance(err, MstmError) else err
                if not isinstance(cause, OSError) or cause.errno not in _NO_SPACE:
                    raise
                # a full file system: a receipt that says so, the sender tries again later
                results = [Result(Status.IO_ERROR, f"cannot stage: {cause.strerror}")
                           ] * len(control.items)
                for item, result in zip(control.items, results, strict=True):
                    self.publisher.log_item(job, item, result)
            else:
                results = self.publisher.receive_all(job, control.items)
        finally:
            if job.stage_fd >= 0:
                os.close(job.stage_fd)
            if source_fd is not None:
                os.close(source_fd)
        for item, result in zip(control.items, results, strict=True):
            batch_summary.count(result.status, item.size)
        made = self.publisher.make_dirs(job, control.dirs)
        for status in made:
            batch_summary.count(status, 0)
        receipt = protocol.Receipt(batch, (*(
            (item.relpath, result.status)
            for item, result in zip(control.items, results, strict=True)),
            *zip(control.dirs, made, strict=True)))
        write_atomic(areas.i_fd, control.receipt, protocol.render_receipt(receipt))
        areas.unstage(job.key)
        summary.batches += 1
        summary.merge(batch_summary)
        level = logging.INFO if not batch_summary.failed else logging.WARNING
        log.log(level, "%s: batch %s answered: %d ok (%d bytes), %d not ok %s in %.2f s",
                s.stream, batch, batch_summary.ok, batch_summary.bytes, batch_summary.failed,
                batch_summary.statuses, time.monotonic() - t0,
                extra=fields(stream=s.stream, item=batch,
                             result="ok" if not batch_summary.failed else "partial"))
