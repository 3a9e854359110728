"""MiStaMover compatibility: its handshake files are answered too, during a migration.

A MiStaMover sender puts one data file ``I/<file>`` and a hidden control file for it
(one item, MD5); see the MiStaMover section of :mod:`mstm.protocol` for the names and
contents.  The item goes through the same staging, check and publication as an mstm
batch's (:class:`~mstm.receive.batch.Publisher`), and the receipt is MiStaMover's.
Three of MiStaMover's defects are dealt with: a control file may arrive before its data
file (defect 3: it waits MSM_DATA_GRACE), its thank-you files never came (defect 4:
mstm.receive.cleanup expires its receipts), and the peer chose the receipt and thank-you
names (defect 13: a receipt name only in the shape MiStaMover's sender gives it, and a
thank-you removes only the receipt its own name derives from).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from contextlib import suppress

from mstm import protocol
from mstm.log import show
from mstm.protocol import ControlItem, ProtocolError, Status
from mstm.receive.areas import STAGING, Areas, BadHandshake, exists_in, write_atomic
from mstm.receive.batch import Job, Publisher
from mstm.receive.settings import Summary
from mstm.safefs import open_dir, remove_tree

log = logging.getLogger("mstm.receive")

# A MiStaMover control may arrive before its data file (its defect 3): wait this long.
MSM_DATA_GRACE = 30.0
# A hidden file named like a handshake file, with unknown content, may still be being
# written by someone; after this long it is garbage.
STALE_SECONDS = 60.0


class MiStaMover:
    """Answers MiStaMover's control and thank-you files (hidden names: ".<file>....")."""

    def __init__(self, areas: Areas, publisher: Publisher) -> None:
        self.areas = areas
        self.s = areas.s
        self.publisher = publisher

    def on_control(self, name: str, summary: Summary) -> float | None:
        """Answer a MiStaMover control file; in how many seconds to look again, if any."""
        s, areas = self.s, self.areas
        data = areas.read(name, protocol.MSM_MAX_BYTES)
        if data is None:
            return None
        if not data.startswith(protocol.MSM_CONTROL_MAGIC[0] + b"\n"):
            return self._unknown_hidden(name, data)
        try:
            c = protocol.parse_mistamover_control(data, receipt_ext=s.receipt_ext)
        except ProtocolError as err:
            raise BadHandshake(f"MiStaMover {err}") from None
        if name != protocol.mistamover_control_name(c.filename, control_ext=s.control_ext):
            raise BadHandshake(f"MiStaMover control file for {c.filename!r} under another"
                               " name")
        if any(c.filename.endswith("." + ext)
               for ext in (s.control_ext, s.receipt_ext, s.thanks_ext)):
            raise BadHandshake(f"MiStaMover data file name {c.filename!r} is a handshake"
                               " file name")
        if areas.exists(c.receipt) is not None:  # answered before a crash
            remove_tree(name, areas.i_fd)
            return None
        st = areas.exists(name)
        if st is None:
            return None
        # MiStaMover's sender could deliver the control before the data (its defect 3)
        if areas.exists(c.filename) is None:
            age = time.time() - st.st_ctime
            key = areas.stage_key(name)
            staged_before = exists_in(areas.stage_parent, f"{STAGING}/{key}")
            if age < MSM_DATA_GRACE and not staged_before:
                summary.deferred += 1
                return MSM_DATA_GRACE - age
        item = ControlItem(c.filename, c.size, c.md5)
        job = Job(label="MiStaMover control " + name, key=areas.stage_key(name),
                  algorithm="md5", source_fd=areas.i_fd)
        try:
            job.stage_fd = open_dir([job.key], areas.open_stage_root(), create=True,
                                    mode=0o700)
            (result,) = self.publisher.receive_all(job, [item])
        finally:
            if job.stage_fd >= 0:
                os.close(job.stage_fd)
        if result.status is not Status.OK:  # as MiStaMover did: the sender sends it again
            with suppress(OSError):
                if stat.S_ISREG(os.stat(c.filename, dir_fd=areas.i_fd,
                                        follow_symlinks=False).st_mode):
                    os.unlink(c.filename, dir_fd=areas.i_fd)
        ok = result.status is Status.OK
        receipt = protocol.MsmReceipt(
            filename=c.filename, code=protocol.MSM_CODES[result.status],
            size=c.size if ok else -1, md5=c.md5 if ok else "",
            thanks=protocol.mistamover_thanks_name(c.receipt, receipt_ext=s.receipt_ext,
                                                   thanks_ext=s.thanks_ext))
        write_atomic(areas.i_fd, c.receipt, protocol.render_mistamover_receipt(receipt))
        remove_tree(name, areas.i_fd)
        areas.unstage(job.key)
        summary.batches += 1
        summary.count(result.status, c.size)
        return None

    def on_thanks(self, name: str, summary: Summary) -> float | None:
        """A MiStaMover thank-you: remove the receipt its own name derives from."""
        s, areas = self.s, self.areas
        data = areas.read(name, protocol.MSM_MAX_BYTES)
        if data is None:
            return None
        if not data.startswith(protocol.MSM_THANKS_MAGIC[0] + b"\n"):
            return self._unknown_hidden(name, data)
        try:
            named = protocol.parse_mistamover_thanks(data)
        except ProtocolError as err:
            raise BadHandshake(f"MiStaMover {err}") from None
        # only the receipt this thank-you's own name derives from (we chose that name)
        derived = name[: -len(s.thanks_ext)] + s.receipt_ext
        if named != derived or not protocol.mistamover_receipt_shape(derived, s.receipt_ext):
            raise BadHandshake(f"MiStaMover thank-you names {named[:80]!r}, expected"
                               f" {derived[:80]!r}")
        st = areas.exists(derived)
        if st is not None and stat.S_ISREG(st.st_mode):
            os.unlink(derived, dir_fd=areas.i_fd)
        os.unlink(name, dir_fd=areas.i_fd)
        summary.thanked += 1
        log.info("%s: MiStaMover receipt %s acknowledged", s.stream, show(derived))
        return None

    def _unknown_hidden(self, name: str, data: bytes) -> float | None:
        """A hidden handshake-like file with unknown content: wait, then quarantine."""
        st = self.areas.exists(name)
        if st is None:
            return None
        if data.startswith(b"mstm-") or not data:  # maybe a temp file being written
            age = time.time() - st.st_mtime
            if age < STALE_SECONDS:
                return STALE_SECONDS - age
        raise BadHandshake("neither an mstm nor a MiStaMover handshake file")
