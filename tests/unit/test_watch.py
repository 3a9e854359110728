"""Watcher: inotify wake-ups, burst coalescing, the polling fallback, wake()."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import inotify_simple
import pytest

from mstm.watch import Watcher


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[Watcher]:
    (tmp_path / "stream").mkdir()
    w = Watcher(tmp_path / "stream", poll_interval=30)
    assert w.backend == "inotify"
    yield w
    w.close()


def after(delay: float, action: Callable[[], object]) -> threading.Thread:
    """Run *action* in a thread after *delay* seconds."""

    def run() -> None:
        time.sleep(delay)
        action()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def timed_wait(w: Watcher, timeout: float | None) -> tuple[bool, float]:
    t0 = time.monotonic()
    result = w.wait(timeout)
    return result, time.monotonic() - t0


def drain(w: Watcher) -> int:
    """Wake-ups until quiet for 0.3 s."""
    n = 0
    while w.wait(0.3):
        n += 1
    return n


def test_wait_times_out_with_false_when_nothing_happens(watcher: Watcher) -> None:
    changed, took = timed_wait(watcher, 0.3)
    assert changed is False
    assert 0.25 <= took < 1.0


def test_rename_into_the_directory_wakes_within_a_second(watcher: Watcher, tmp_path: Path) -> None:
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"x")
    after(0.2, lambda: os.rename(outside, tmp_path / "stream" / "moved-in.dat"))
    changed, took = timed_wait(watcher, 5)
    assert changed is True and took < 1.0


def test_file_closed_after_writing_wakes(watcher: Watcher, tmp_path: Path) -> None:
    after(0.1, lambda: (tmp_path / "stream" / "new.dat").write_bytes(b"x"))
    changed, took = timed_wait(watcher, 5)
    assert changed is True and took < 1.0


def test_new_file_in_a_newly_created_subdirectory_wakes(watcher: Watcher, tmp_path: Path) -> None:
    nested = tmp_path / "stream" / "sub" / "deeper"
    after(0.1, lambda: nested.mkdir(parents=True))
    assert timed_wait(watcher, 5)[0] is True
    drain(watcher)
    after(0.1, lambda: (nested / "f.dat").write_bytes(b"x"))
    changed, took = timed_wait(watcher, 5)
    assert changed is True and took < 1.0


def test_directory_moved_into_the_tree_is_watched_too(watcher: Watcher, tmp_path: Path) -> None:
    staged = tmp_path / "staged" / "inner"
    staged.mkdir(parents=True)
    os.rename(tmp_path / "staged", tmp_path / "stream" / "arrived")
    assert watcher.wait(5) is True
    drain(watcher)
    after(0.1, lambda: (tmp_path / "stream" / "arrived" / "inner" / "f").write_bytes(b"x"))
    changed, took = timed_wait(watcher, 5)
    assert changed is True and took < 1.0


def test_existing_subdirectories_are_watched_from_the_start(tmp_path: Path) -> None:
    (tmp_path / "stream" / "a" / "b").mkdir(parents=True)
    with Watcher(tmp_path / "stream", poll_interval=30) as w:
        after(0.1, lambda: (tmp_path / "stream" / "a" / "b" / "f").write_bytes(b"x"))
        changed, took = timed_wait(w, 5)
        assert changed is True and took < 1.0


def test_non_recursive_watcher_ignores_subdirectories(tmp_path: Path) -> None:
    (tmp_path / "stream" / "sub").mkdir(parents=True)
    with Watcher(tmp_path / "stream", poll_interval=30, recursive=False) as w:
        (tmp_path / "stream" / "sub" / "f").write_bytes(b"x")
        assert w.wait(0.3) is False
        (tmp_path / "stream" / "top").write_bytes(b"x")
        assert w.wait(5) is True


def test_deletion_wakes(watcher: Watcher, tmp_path: Path) -> None:
    f = tmp_path / "stream" / "f"
    f.write_bytes(b"x")
    drain(watcher)
    after(0.1, f.unlink)
    assert timed_wait(watcher, 5)[0] is True


def test_burst_of_a_thousand_files_is_one_wake_up(watcher: Watcher, tmp_path: Path) -> None:
    def burst() -> None:
        for i in range(1000):
            (tmp_path / "stream" / f"f{i:04d}").write_bytes(b"x")

    t = after(0.1, burst)
    assert watcher.wait(5) is True
    t.join()
    assert drain(watcher) <= 1  # the whole burst was coalesced into (at most) two


def test_wake_interrupts_an_unbounded_wait(watcher: Watcher) -> None:
    after(0.2, watcher.wake)
    changed, took = timed_wait(watcher, None)
    assert changed is True and took < 1.0
    assert watcher.wait(0.1) is False  # the wake-up was consumed


def test_wake_before_wait_is_not_lost(watcher: Watcher) -> None:
    watcher.wake()
    watcher.wake()
    assert timed_wait(watcher, 5)[0] is True
    assert watcher.wait(0.1) is False


def test_deleted_and_recreated_directory_is_watched_again(tmp_path: Path) -> None:
    d = tmp_path / "stream"
    d.mkdir()
    with Watcher(d, poll_interval=0.2) as w:
        shutil.rmtree(d)
        assert w.wait(5) is True
        d.mkdir()
        w.wait(1)  # notices it is back (polls meanwhile)
        drain(w)
        after(0.1, lambda: (d / "f").write_bytes(b"x"))
        changed, took = timed_wait(w, 5)
        assert changed is True and took < 1.0


def test_overflow_counts_as_a_change(watcher: Watcher, monkeypatch: pytest.MonkeyPatch) -> None:
    inotify = watcher._inotify
    overflow = inotify_simple.Event(-1, inotify_simple.flags.Q_OVERFLOW, 0, "")
    readable = [[inotify.fileno()]]  # readable once, then quiet
    monkeypatch.setattr(inotify, "read", lambda timeout=None: [overflow])
    monkeypatch.setattr(watcher, "_poll_fds", lambda fds, t: readable.pop() if readable else [])
    assert watcher.wait(1) is True


# -- polling --------------------------------------------------------------------------


def test_forced_poll_backend_sleeps_at_most_the_poll_interval(tmp_path: Path) -> None:
    with Watcher(tmp_path, poll_interval=0.2, force_poll=True) as w:
        assert w.backend == "poll"
        changed, took = timed_wait(w, 10)
        assert changed is True and 0.15 <= took < 1.0
        changed, took = timed_wait(w, 0.05)
        assert changed is True and took < 0.2


def test_poll_backend_wakes_on_wake(tmp_path: Path) -> None:
    with Watcher(tmp_path, poll_interval=30, force_poll=True) as w:
        after(0.2, w.wake)
        changed, took = timed_wait(w, None)
        assert changed is True and took < 1.0


def test_too_many_directories_for_inotify_falls_back_to_polling_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(5):
        (tmp_path / f"d{i}").mkdir()
    real_add = inotify_simple.INotify.add_watch
    added: list[object] = []

    def limited(self: inotify_simple.INotify, path: object, mask: int) -> int:
        if len(added) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        added.append(path)
        return int(real_add(self, path, mask))

    monkeypatch.setattr(inotify_simple.INotify, "add_watch", limited)
    with caplog.at_level(logging.WARNING, logger="mstm.watch"):
        w = Watcher(tmp_path, poll_interval=0.1)
    try:
        assert w.backend == "poll"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "max_user_watches" in warnings[0].getMessage()
        assert timed_wait(w, 5)[0] is True
    finally:
        w.close()


def test_inotify_unavailable_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_instances(*a: object, **kw: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(inotify_simple.INotify, "__init__", no_instances)
    with caplog.at_level(logging.WARNING, logger="mstm.watch"):
        w = Watcher(tmp_path, poll_interval=0.1)
    try:
        assert w.backend == "poll"
        assert "inotify is unavailable" in caplog.text
    finally:
        w.close()


def test_close_is_idempotent_and_wake_after_close_is_harmless(tmp_path: Path) -> None:
    w = Watcher(tmp_path, poll_interval=1)
    w.close()
    w.close()
    w.wake()
    with pytest.raises(ValueError):
        w.wait(0)
