"""MiStaMover's handshake files, so that mstm-receive can answer a MiStaMover sender.

MiStaMover's own handshake files (cedadev/mistamover, lib/ControlFile.py,
lib/ReceiptFile.py, lib/ThankyouFile.py, lib/AbstractControlFile.py,
lib/DatasetArrivalMonitor.py, lib/TransferModules/RsyncTransfer.py), so that an
mstm-receive can answer a MiStaMover sender during a migration.  One item per
handshake; each file is a start line, one value per line, an end line, each line
ending in LF:

  control   (sender, ".<item>.<control_ext>" next to the data file "<item>"):
            _start_stager_ctrl_data_ / item name / size / md5 hex /
            receipt name (".<item>.<time>.<receipt_ext>") / _end_stager_ctrl_data_
  receipt   (receiver, under the name the control asked for):
            _start_stager_receipt_data_ / item name / status code / size or -1 /
            md5 or empty / thank-you name (".<item>.<time>.<thanks_ext>") /
            _end_stager_receipt_data_
  thank-you (sender, under the name the receipt asked for):
            _start_stager_thankyou_ / receipt name / _end_stager_thankyou_

Status codes: 0 success, 1 bad size, 2 bad checksum, 3 I/O error, 4 no such file.
MiStaMover let the peer choose the receipt and thank-you names (its defect 13); here a
receipt name is accepted only in the shape MiStaMover's sender gives it, derived from
the item's name, and a thank-you may only remove the receipt its own name derives from.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass

from mstm.protocol.files import NAME_MAX, SIZE_RE, ProtocolError, Status

MSM_CONTROL_MAGIC = (b"_start_stager_ctrl_data_", b"_end_stager_ctrl_data_")
MSM_RECEIPT_MAGIC = (b"_start_stager_receipt_data_", b"_end_stager_receipt_data_")
MSM_THANKS_MAGIC = (b"_start_stager_thankyou_", b"_end_stager_thankyou_")
MSM_MAX_BYTES = 4096
_MSM_TIME = r"[0-9]{1,20}(?:\.[0-9]{1,9})?"  # MiStaMover's "%.2f" % time.time()
_MD5_RE = re.compile(r"\A[0-9a-f]{32}\Z")
_MSM_SIZE_RE = re.compile(r"\A(?:-1|0|[1-9][0-9]{0,18})\Z")


class MsmCode(enum.IntEnum):
    SUCCESS = 0
    BAD_SIZE = 1
    BAD_CKSUM = 2
    IO_ERROR = 3
    NO_SUCH_FILE = 4


# Our statuses in MiStaMover's codes: it has no "refused"; an I/O error is the nearest
# (its sender retries, and the receiver's log says why).
MSM_CODES: dict[Status, MsmCode] = {
    Status.OK: MsmCode.SUCCESS,
    Status.BAD_SIZE: MsmCode.BAD_SIZE,
    Status.BAD_CHECKSUM: MsmCode.BAD_CKSUM,
    Status.IO_ERROR: MsmCode.IO_ERROR,
    Status.MISSING: MsmCode.NO_SUCH_FILE,
    Status.REFUSED: MsmCode.IO_ERROR,
}


@dataclass(frozen=True)
class MsmControl:
    filename: str  # one plain file name, as os.fsdecode gives it
    size: int
    md5: str
    receipt: str


@dataclass(frozen=True)
class MsmReceipt:
    filename: str
    code: MsmCode
    size: int  # -1: not known
    md5: str  # "": not known
    thanks: str


def is_mistamover(data: bytes) -> bool:
    """True if *data* starts like one of MiStaMover's handshake files."""
    return any(data.startswith(magic + b"\n")
               for magic, _ in (MSM_CONTROL_MAGIC, MSM_RECEIPT_MAGIC, MSM_THANKS_MAGIC))


def _msm_lines(data: bytes, what: str, magic: tuple[bytes, bytes], count: int) -> list[bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what}: not bytes")
    data = bytes(data)
    if len(data) > MSM_MAX_BYTES:
        raise ProtocolError(f"{what} larger than {MSM_MAX_BYTES} bytes")
    if not data.endswith(b"\n"):
        raise ProtocolError(f"{what}: missing final newline")
    lines = data[:-1].split(b"\n")
    if len(lines) != count + 2 or lines[0] != magic[0] or lines[-1] != magic[1]:
        raise ProtocolError(f"{what}: not a MiStaMover {what} ({count} values between"
                            f" {magic[0].decode()} and {magic[1].decode()})")
    return lines[1:-1]


def _msm_name(raw: bytes, what: str) -> str:
    """A plain file name (one component, not hidden) from a MiStaMover file."""
    if (not raw or b"/" in raw or b"\0" in raw or raw.startswith(b".")
            or len(raw) > NAME_MAX or b"\r" in raw):
        raise ProtocolError(f"{what}: unsafe file name {raw[:80]!r}")
    return os.fsdecode(raw)


def _msm_handshake_name(raw: bytes, what: str) -> str:
    if (not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..")
            or len(raw) > NAME_MAX):
        raise ProtocolError(f"{what}: unsafe file name {raw[:80]!r}")
    return os.fsdecode(raw)


def mistamover_control_name(filename: str, *, control_ext: str) -> str:
    """The control file name MiStaMover's sender uses for the data file *filename*."""
    return f".{filename}.{control_ext}"


def mistamover_receipt_ok(filename: str, receipt: str, receipt_ext: str) -> bool:
    """Is *receipt* a receipt name MiStaMover's sender would ask for, for *filename*?"""
    pattern = rf"\.{re.escape(filename)}\.{_MSM_TIME}\.{re.escape(receipt_ext)}"
    return re.fullmatch(pattern, receipt, re.DOTALL) is not None


def mistamover_receipt_shape(receipt: str, receipt_ext: str) -> bool:
    """Is *receipt* shaped like a MiStaMover receipt name (".<item>.<time>.<ext>")?"""
    pattern = rf"\.[^/]+\.{_MSM_TIME}\.{re.escape(receipt_ext)}"
    return re.fullmatch(pattern, receipt, re.DOTALL) is not None


def mistamover_thanks_name(receipt: str, *, receipt_ext: str, thanks_ext: str) -> str:
    """The thank-you name we ask for in a receipt: the receipt's, with thanks_ext."""
    if not receipt.endswith("." + receipt_ext):
        raise ProtocolError(f"{receipt!r} does not end with .{receipt_ext}")
    return receipt[: -len(receipt_ext)] + thanks_ext


def parse_mistamover_control(data: bytes, *, receipt_ext: str) -> MsmControl:
    what = "control file"
    raw_name, raw_size, raw_md5, raw_receipt = _msm_lines(data, what, MSM_CONTROL_MAGIC, 4)
    filename = _msm_name(raw_name, what)
    size = raw_size.decode("ascii", "replace")
    if not SIZE_RE.match(size):
        raise ProtocolError(f"{what}: bad size {size[:30]!r}")
    md5 = raw_md5.decode("ascii", "replace")
    if not _MD5_RE.match(md5):
        raise ProtocolError(f"{what}: bad md5 {md5[:80]!r}")
    receipt = _msm_handshake_name(raw_receipt, what)
    if not mistamover_receipt_ok(filename, receipt, receipt_ext):
        raise ProtocolError(f"{what}: receipt name {receipt[:80]!r} is not"
                            f" .{filename[:80]}.<time>.{receipt_ext}")
    return MsmControl(filename, int(size), md5, receipt)


def render_mistamover_control(c: MsmControl) -> bytes:
    values = [os.fsencode(c.filename), str(c.size).encode(), c.md5.encode("ascii"),
              os.fsencode(c.receipt)]
    return b"\n".join([MSM_CONTROL_MAGIC[0], *values, MSM_CONTROL_MAGIC[1]]) + b"\n"


def parse_mistamover_receipt(data: bytes) -> MsmReceipt:
    what = "receipt"
    raw_name, raw_code, raw_size, raw_md5, raw_thanks = _msm_lines(
        data, what, MSM_RECEIPT_MAGIC, 5)
    filename = _msm_name(raw_name, what)
    try:
        code = MsmCode(int(raw_code.decode("ascii"))) if raw_code.isdigit() else None
    except (ValueError, UnicodeDecodeError):
        code = None
    if code is None:
        raise ProtocolError(f"{what}: unknown status code {raw_code[:20]!r}")
    size = raw_size.decode("ascii", "replace")
    if not _MSM_SIZE_RE.match(size):
        raise ProtocolError(f"{what}: bad size {size[:30]!r}")
    md5 = raw_md5.decode("ascii", "replace")
    if md5 and not _MD5_RE.match(md5):
        raise ProtocolError(f"{what}: bad md5 {md5[:80]!r}")
    return MsmReceipt(filename, code, int(size), md5, _msm_handshake_name(raw_thanks, what))


def render_mistamover_receipt(r: MsmReceipt) -> bytes:
    values = [os.fsencode(r.filename), str(int(r.code)).encode(), str(r.size).encode(),
              r.md5.encode("ascii"), os.fsencode(r.thanks)]
    return b"\n".join([MSM_RECEIPT_MAGIC[0], *values, MSM_RECEIPT_MAGIC[1]]) + b"\n"


def parse_mistamover_thanks(data: bytes) -> str:
    """The receipt name a MiStaMover thank-you file acknowledges."""
    (raw,) = _msm_lines(data, "thank-you file", MSM_THANKS_MAGIC, 1)
    return _msm_handshake_name(raw, "thank-you file")


def render_mistamover_thanks(receipt: str) -> bytes:
    return b"\n".join([MSM_THANKS_MAGIC[0], os.fsencode(receipt), MSM_THANKS_MAGIC[1]]) + b"\n"
