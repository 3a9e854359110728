"""What a run of the sender tells: the summary (--json), and progress on a terminal."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mstm import humanize
from mstm.log import show
from mstm.spool import Spool
from mstm.transports.base import Item

if TYPE_CHECKING:
    _TqdmBase = tqdm[Any]
else:
    _TqdmBase = tqdm


def json_path(relpath: str) -> dict[str, str]:
    """*relpath* for JSON output: as text, plus its bytes in base64 if it is not UTF-8."""
    try:
        relpath.encode("utf-8")
        return {"path": relpath}
    except UnicodeEncodeError:
        raw = os.fsencode(relpath)
        return {"path": raw.decode("utf-8", "backslashreplace"),
                "path_base64": base64.b64encode(raw).decode()}


@dataclass
class Summary:
    stream: str
    delivered: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    retried: int = 0
    bytes: int = 0
    paused: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    queued: int = 0
    settling: int = 0  # items that exist but are not ready yet (the scan's "waiting")
    waiting_retry: bool = False  # items wait for a retry due past --max-wait

    def to_json(self) -> str:
        return json.dumps({
            "stream": self.stream,
            "delivered": len(self.delivered),
            "delivered_bytes": self.bytes,
            "failed": self.failed,
            "skipped": self.skipped,
            "retried": self.retried,
            "queued": self.queued,
            "settling": self.settling,
            "paused": self.paused,
            "error": self.error,
            "seconds": round(time.time() - self.started, 3),
            "items": self.delivered,
        }, ensure_ascii=False, indent=None)


class _Bar(_TqdmBase):
    """tqdm, with the fields of mstm's progress line (binary sizes, the current file)."""

    monitor_interval = 0  # no monitor thread: updates are already few (miniters=1)
    _time: Callable[[], float]  # tqdm's clock (a fake one in tests)

    def __init__(self, *args: Any, extra: dict[str, Any], **kwargs: Any) -> None:
        self.extra = extra  # replaced whole, never changed: read by the drawing thread
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        d = super().format_dict
        rate = d.get("rate")
        if rate is None and d.get("elapsed"):
            rate = d["n"] / d["elapsed"]
        d.update(self.extra, done=humanize.size(d["n"]),
                 size=humanize.size(d["total"]) if d.get("total") is not None else "?",
                 speed=f"{humanize.size(rate)}/s" if rate else "? B/s")
        return d


# what the line shows while sending: percent, bar, bytes of the run's total, the
# current rate (tqdm's moving average), the time left, files done and the file being sent
RUNNING = ("{desc}: {percentage:3.0f}%|{bar}| {done} of {size}, {speed}, ETA {remaining}, "
           "{files}{current}")
# and once the run ended: the average rate and the time it took
FINISHED = "{desc}: {percentage:3.0f}%|{bar}| {done} of {size}, {speed}, in {elapsed}, {files}"
# with no total (a deep queue): bytes, rate and files only
UNSIZED = "{desc}: {done}, {speed}, {elapsed}, {files}{current}"
NAME_MAX = 48  # columns of the current file's name, at most (shortened in the middle)
DEEP_QUEUE = 20_000  # queued items beyond this are not read for their sizes


def queued_size(spool: Spool, *, limit: int = DEEP_QUEUE) -> tuple[int, int | None]:
    """(items, bytes) waiting in *spool*'s queue; bytes None when more than *limit*
    items wait (reading every record of a deep queue takes too long for a progress bar)."""
    items = spool.count("new")
    if items > limit:
        return items, None
    return items, sum(r.size for r in spool.iter_records("new"))


class TtyProgress:
    """The progress line of a run on a terminal: a tqdm bar on stderr.

    It shows the percent of the run's total bytes, the bytes sent and the total, the
    current rate, the time left, the files sent and the file being sent.  The total is
    what this run will send: the first batch plus what is still queued when it starts,
    grown when a later batch brings more (an item queued or retried meanwhile), so the
    bar's total may grow during a run.  Updates are throttled (tqdm's *mininterval*);
    log lines (``-v``: one per delivered file) are written above the bar, never into it.
    Only made when stderr is a terminal (see mstm.cli.send): without it the transports
    are given no progress callback at all.
    """

    def __init__(self, stream: str, *,
                 queued: Callable[[], tuple[int, int | None]] | None = None,
                 file: TextIO | None = None, mininterval: float = 0.2,
                 ncols: int | None = None, clock: Callable[[], float] | None = None) -> None:
        self.stream = stream
        self._queued = queued
        self._file = file
        self._mininterval = mininterval
        self._ncols = ncols
        self._clock = clock
        self._bar: _Bar | None = None
        self._redirect = contextlib.ExitStack()
        self._base_files = 0
        self._base_bytes = 0
        self._files = 0
        self._total_files: int | None = 0
        self._sized = True  # the total is known (not a deep queue)
        self._current: str | None = None

    @property
    def files(self) -> int:
        return self._files

    @property
    def bytes(self) -> int:
        return int(self._bar.n) if self._bar is not None else 0

    def batch_start(self, items: Sequence[Item]) -> None:
        """A batch of *items* is about to be sent (the first one draws the bar)."""
        nbytes = sum(i.size for i in items)
        self._current = None
        if self._bar is None:
            more_items, more_bytes = self._queued() if self._queued else (0, 0)
            self._sized = more_bytes is not None
            self._total_files = None if any(i.is_dir for i in items) else \
                len(items) + more_items
            self._bar = self._new_bar(nbytes + more_bytes if more_bytes is not None else None)
            return
        if any(i.is_dir for i in items):
            self._total_files = None  # a directory item holds files we did not count
        elif self._total_files is not None:
            self._total_files = max(self._total_files, self._base_files + len(items))
        if self._sized and self._bar.total is not None and \
                self._base_bytes + nbytes > self._bar.total:
            self._bar.total = self._base_bytes + nbytes  # more than was queued: grow
        self._describe()

    def batch_progress(self, files: int, nbytes: int, current: str | None = None, /) -> None:
        """The transport's report: (*files*, *nbytes*) so far in this batch, and the file
        it is sending (called from its worker thread; cheap, tqdm throttles drawing)."""
        bar = self._bar
        if bar is None:
            return
        self._files = self._base_files + files
        if current is not None:
            self._current = current
        done = self._base_bytes + nbytes
        if self._sized and bar.total is not None and done > bar.total:
            bar.total = done
        self._describe()
        if done > bar.n:
            bar.update(done - bar.n)

    def batch_done(self) -> None:
        """The batch's transfer ended: the target hashes it now ("verifying")."""
        if self._bar is not None:
            self._base_files, self._base_bytes = self._files, int(self._bar.n)
            self._current = None
            self._bar.extra = {"files": self._files_text(), "current": ", verifying"}
            self._bar.refresh()

    def finish(self) -> None:
        """The run ended: the line shows what was sent, at what average rate, in what
        time (left on the screen)."""
        bar, self._bar = self._bar, None
        if bar is None:
            return
        self._current = None
        bar.extra = {"files": self._files_text()}
        if bar.total is not None:
            bar.bar_format = FINISHED
        bar.close()  # drawn once more, with the average rate over the whole run
        self._redirect.close()

    # -- drawing ---------------------------------------------------------------
    def _new_bar(self, total: int | None) -> _Bar:
        file = self._file if self._file is not None else sys.stderr
        bar = _Bar(total=total, desc=show(self.stream), file=file, leave=True,
                   mininterval=self._mininterval, miniters=1, ncols=self._ncols,
                   dynamic_ncols=self._ncols is None,
                   bar_format=RUNNING if total is not None else UNSIZED, delay=0.0,
                   disable=False, extra={"files": self._files_text(), "current": ""})
        if self._clock is not None:
            bar._time = self._clock
            bar.start_t = bar.last_print_t = self._clock()
        if file is sys.stderr:  # log lines (-v) go above the bar, not through it
            self._redirect.enter_context(
                logging_redirect_tqdm(loggers=[logging.getLogger("mstm")], tqdm_class=_Bar))
        return bar

    def _describe(self) -> None:
        assert self._bar is not None
        current = f": {_fit(show(self._current), NAME_MAX)}" if self._current else ""
        self._bar.extra = {"files": self._files_text(), "current": current}

    def _files_text(self) -> str:
        if self._total_files is None:
            return f"{self._files} files"
        return f"{self._files}/{max(self._total_files, self._files)} files"


def _fit(text: str, width: int) -> str:
    """*text* in at most *width* characters, shortened in the middle."""
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return f"{text[:head]}...{text[len(text) - (width - 3 - head):]}"
