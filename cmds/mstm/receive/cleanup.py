"""Housekeeping between two batches: crash leftovers and answers nobody acknowledged.

Leftovers of a crash are removed at start-up and then every minute: temp files of ours in
I, staging directories of batches no longer pending (only those holding nothing but
staged files: anything else is left alone with a warning), and
``D/.mstm-staging/.replaced.*`` trees unchanged for an hour (see
:meth:`Cleanup.leftovers`).  Everything the receiver removes goes through
safefs.remove_tree: iterative, from descriptors, no symbolic link followed, no FIFO or
device opened, no mount point entered.

Answered batches whose thank-you never came are removed after ANSWERED_TTL, and
MiStaMover receipts (whose sender never acknowledged them: its defect 4) after
MSM_RECEIPT_TTL (see :meth:`Cleanup.expire`).

A housekeeping task that fails is logged, never fatal (:func:`housekeeping`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

from mstm import protocol
from mstm.log import show
from mstm.receive.areas import STAGING, TMP_PREFIX, Areas, BadHandshake, closing, exists_in
from mstm.receive.survey import changed_at
from mstm.runloop import RunLoop
from mstm.safefs import DIR_FLAGS, remove_tree

log = logging.getLogger("mstm.receive")
_T = TypeVar("_T")

# An answered batch whose thank-you never came is cleaned up after this long.
ANSWERED_TTL = 7 * 24 * 3600.0
# MiStaMover's sender never delivered its thank-you files (its defect 4).
MSM_RECEIPT_TTL = 24 * 3600.0
# The exact shapes of the names mstm makes in staging (see Cleanup.leftovers): MiStaMover
# staging keys (Areas.stage_key), staged items and their partial copies (batch.py), and
# the old directories the transports' publishers set aside in D/.mstm-staging (rsync over
# ssh: a pid; local, sftp: 12 hex digits; ftp: the same with ".zip").
_MSM_KEY_RE = re.compile(r"\Am-[0-9a-f]{32}\Z")
_STAGED_RE = re.compile(r"\A[0-9]{1,4}-[0-9a-f]{40}(?:\.part)?\Z")
_REPLACED_RE = re.compile(r"\A\.replaced\.(?:[0-9]{1,10}|[0-9a-f]{12}(?:\.zip)?)\Z")
REPLACED_SECONDS = 3600.0  # a .replaced.* tree unchanged this long is a crash's leftover


def housekeeping(stream: str, what: str, task: Callable[[_T], float | None],
                 arg: _T) -> float | None:
    """Run a periodic clean-up, *what*: an error in it is logged, never fatal."""
    try:
        return task(arg)
    except Exception as err:
        log.error("%s: %s failed: %s: %s", stream, what, type(err).__name__, err,
                  exc_info=not isinstance(err, OSError))
        return None


class WarnOnce:
    """A warning about something left in place is logged once per name (until forgotten:
    see :meth:`keep_only`)."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.names: set[str] = set()

    def __call__(self, name: str, msg: str, *args: object) -> None:
        """Log *msg* (its first argument: the stream) unless *name* was warned about."""
        if name not in self.names:
            self.names.add(name)
            log.warning(msg, self.stream, *args)

    def keep_only(self, present: set[str]) -> None:
        """Forget the names not in *present* (they may be warned about again)."""
        self.names &= present


class Cleanup:
    """Removes crash leftovers and expired answers from I, staging and D/.mstm-staging."""

    def __init__(self, areas: Areas, loop: RunLoop, warn_once: WarnOnce) -> None:
        self.areas = areas
        self.s = areas.s
        self.loop = loop
        self.warn_once = warn_once

    def leftovers(self, names: list[str]) -> None:
        """Remove what a crash (or a failed removal) of mstm left, at start and then
        periodically, between two batches: only names of the exact shapes mstm makes --
        our temp files in I (regular files named TMP_PREFIX...), staging directories of
        batches no longer pending whose every entry is a staged file of ours, and the
        ``.replaced.*`` trees older than an hour that a publisher set aside in
        ``D/.mstm-staging`` (the old version of a directory it replaced).  Anything else
        found there (someone's data) is left alone, with one warning.  *names*: I's
        listing."""
        areas = self.areas
        for name in names:
            if name.startswith(TMP_PREFIX):
                with suppress(OSError):
                    if stat.S_ISREG(os.stat(name, dir_fd=areas.i_fd,
                                            follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=areas.i_fd)
        pending = {areas.stage_key(n) for n in names if n.endswith("." + self.s.control_ext)}
        if exists_in(areas.stage_parent, STAGING):
            root = areas.open_stage_root()
            try:
                for key in os.listdir(root):
                    if key in pending:
                        continue
                    if _REPLACED_RE.match(key) and not areas.same_fs:
                        continue  # D's staging, shared with publishers: see below
                    if not self._ours_to_remove(root, key):
                        self.warn_once(f"{STAGING}/{key}", "%s: %s/%s is not something"
                                       " mstm-receive staged; left alone", STAGING, show(key))
                        continue
                    try:
                        remove_tree(key, root, self.loop.tick)
                    except OSError as err:
                        self.warn_once(f"{STAGING}/{key}", "%s: cannot remove %s/%s: %s;"
                                       " tried again later", STAGING, show(key), err)
            finally:
                areas.release_stage_root()
        self._clean_replaced()

    def _ours_to_remove(self, root: int, key: str) -> bool:
        """Is staging/<key> one of our staging directories: a key's shape, and only
        staged files (or their partial copies) in it?"""
        if not (protocol.BATCH_RE.match(key) or _MSM_KEY_RE.match(key)):
            return False
        try:
            fd = os.open(key, DIR_FLAGS, dir_fd=root)
        except OSError:
            return False
        with closing(fd):
            try:
                for entry in os.listdir(fd):
                    if not _STAGED_RE.match(entry):
                        return False
                    st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        return False
            except OSError:
                return False
        return True

    def _clean_replaced(self) -> None:
        """``D/.mstm-staging/.replaced.*`` left by a publisher killed between moving an
        old directory aside and removing it; only those of its exact name shapes, owned
        by us, and unchanged for an hour."""
        try:
            fd = os.open(STAGING, DIR_FLAGS, dir_fd=self.areas.d_fd)
        except OSError:
            return
        with closing(fd):
            try:
                names = [n for n in os.listdir(fd) if _REPLACED_RE.match(n)]
            except OSError:
                return
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if st.st_uid != os.geteuid() or time.time() - changed_at(
                        st, time.time()) < REPLACED_SECONDS:
                    continue
                try:
                    remove_tree(name, fd, self.loop.tick)
                except OSError as err:
                    self.warn_once(f"{STAGING}/{name}", "%s: cannot remove %s/%s: %s;"
                                   " tried again later", STAGING, show(name), err)
                else:
                    log.info("%s: removed %s/%s, left by an interrupted publication",
                             self.s.stream, STAGING, show(name))

    def expire(self, names: list[str]) -> None:
        """Answered handshakes whose thank-you never came (MiStaMover's defect 4)."""
        s, areas = self.s, self.areas
        now = time.time()
        suffix = "." + s.receipt_ext
        for name in names:
            if not name.endswith(suffix):
                continue
            stem = name[: -len(suffix)]
            st = areas.exists(name)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            age = now - st.st_mtime
            if protocol.BATCH_RE.match(stem) and age > ANSWERED_TTL:
                log.warning("%s: no thank-you for batch %s in %.0f days; cleaned up",
                            s.stream, stem, age / 86400)
                with suppress(OSError):
                    areas.remove_batch(stem)
            elif stem.startswith(".") and age > MSM_RECEIPT_TTL:
                try:
                    data = areas.read(name, protocol.MSM_MAX_BYTES)
                except (OSError, BadHandshake):
                    continue
                if data is not None and data.startswith(protocol.MSM_RECEIPT_MAGIC[0]):
                    with suppress(OSError):
                        os.unlink(name, dir_fd=areas.i_fd)
                    log.info("%s: MiStaMover receipt %s never acknowledged; removed",
                             s.stream, show(name))
