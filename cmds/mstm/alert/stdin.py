"""``mstm-alert --stdin``: events read from a pipe until EOF, mailed in batches."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import IO

from mstm.alert.batch import Batch
from mstm.alert.compose import alert_context
from mstm.alert.events import from_line, threshold_priority
from mstm.alert.postman import Postman
from mstm.config import GlobalConfig


def read_stdin(stream: IO[str], gcfg: GlobalConfig, postman: Postman,
               clock: Callable[[], float] = time.monotonic) -> int:
    """Gather events from *stream* until EOF; a mail every email_timer and one at the end.

    Returns the number of mails still waiting in the outbox.
    """
    threshold = threshold_priority(gcfg.email.threshold)
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True, name="stdin").start()
    batch = Batch(clock=clock)
    eof = False
    while not eof:
        timeout = batch.opened + gcfg.email.email_timer - clock() if batch else None
        try:
            line = lines.get(timeout=max(timeout, 0.0) if timeout is not None else None)
        except queue.Empty:
            line = ""
        if line is None:
            eof = True
        elif line:
            alert = from_line(line)
            if alert is not None and alert.priority <= threshold:
                batch.add(alert)
        if batch and (eof or clock() >= batch.opened + gcfg.email.email_timer):
            postman.post("alert", alert_context(batch, gcfg.email, gcfg.path))
            batch = Batch(clock=clock)
            postman.deliver(wait_for_lock=True)
    return postman.waiting
