"""A stream's local stop file: whether its sender is paused, and saying so once.

``<directory>/<outgoing.stop_file>`` (``.stop`` by default) pauses the stream's sender,
push or pull; an operator or mstm-diskwatch puts it there.  The target's stop file is
asked by the transports (``stop_file_present``), not here.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from mstm.log import event

log = logging.getLogger("mstm.scan")

#: How much of a stop file is read for its reason.
REASON_BYTES = 200


def is_paused(stream: Any) -> str | None:
    """The reason the local sender of *stream* is paused, or None.

    Paused while ``<directory>/<outgoing.stop_file>`` exists (put there by an operator or
    by mstm-diskwatch).  The first line of a small regular stop file is quoted in the
    reason; FIFOs and the like are never opened.
    """
    path = Path(stream.directory) / stream.outgoing.stop_file
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.debug("cannot check stop file %s: %s", path, e)
        return None
    reason = f"stop file {path} exists"
    if stat.S_ISREG(st.st_mode) and st.st_size > 0:
        first = _head(path).splitlines()
        text = first[0].decode("utf-8", "replace").strip() if first else ""
        if text:
            reason += f": {text}"
    return reason


def say_pause_change(logger: logging.Logger, stream: str, before: str | None,
                     now: str | None) -> None:
    """Log a change of a stream's pause, once: a warning with the new reason, or that it
    resumed (MESSAGE_IDs "paused" and "resumed")."""
    if now == before:
        return
    if now:
        logger.warning("%s: paused: %s", stream, now,
                       extra=event("paused", stream=stream, reason=now))
    elif before:
        logger.info("%s: resumed", stream, extra=event("resumed", stream=stream))


def _head(path: Path) -> bytes:
    """The first bytes of the regular file at *path*, never through a link or a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, REASON_BYTES)
    except OSError:
        return b""
    finally:
        os.close(fd)
