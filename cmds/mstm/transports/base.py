"""The one interface every transport implements, and what it returns.

A transport moves a batch of items from a stream's source directory to its target,
makes them visible under their final names only when complete, and answers what the
target holds (size and sha256 computed on the target) so the sender can verify.
Connection problems are raised as TargetUnavailable; problems with single items are
reported in the result, never raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Where a batch waits at the target until the sender has verified it: without the
# arrival monitor, every item (file or directory) is sent into
# <target_dir>/.mstm-staging/<batch>/, hashed there, and only then published (renamed
# into place); nothing unverified is ever visible under its final name.
STAGING = ".mstm-staging"


def staging_dir(target_dir: str, batch: str) -> str:
    """The directory on the target where *batch* waits for its verification."""
    return f"{target_dir.rstrip('/') or ''}/{STAGING}/{batch}"


@dataclass(frozen=True)
class TransportOptions:
    """What every transport is given, whatever its protocol: the stream's source
    directory, the target directory, and the limits of the stream's [outgoing] section.
    The protocol's own settings (host, credentials, ...) are its constructor's other
    arguments."""

    source_dir: Path
    target_dir: str
    stall_seconds: float = 120.0  # no progress for this long cuts a transfer
    connect_timeout: float = 15.0
    bwlimit: int = 0  # KiB/s, 0 = no limit
    stop_file: str = ".stop"  # its presence at the target pauses the sender
    stop_dirs: tuple[str, ...] = ()  # where the stop file is looked for (none: target_dir)
    follow_symlinks: bool = False  # a file item that is a link goes as the file it names


@dataclass(frozen=True)
class Item:
    relpath: str  # relative to the source directory; surrogateescape str
    size: int
    is_dir: bool = False
    force: bool = False  # re-send even if the target looks current (after a failed check)


@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str | None


@dataclass
class SendResult:
    files: int = 0  # files the transport reports it transferred
    bytes: int = 0
    error: str = ""  # the transport's own words, for the log, when not clean
    exit_code: int = 0
    stopped: bool = False  # abandoned because the caller asked us to stop
    item_errors: dict[str, str] = field(default_factory=dict)


class Progress(Protocol):
    """Told (files done, bytes done) so far in this batch, and, when the transport knows
    it, *current*: the relative path of the file it is sending now (a file inside a
    directory item, too; as the transport has it, possibly escaped by rsync).  Called
    from the transport's worker thread, at most once per chunk; it must be cheap."""

    def __call__(self, files: int, nbytes: int, current: str | None = None, /) -> None: ...


ShouldStop = Callable[[], bool]


class Transport(Protocol):
    name: str

    def open(self) -> None:
        """Connect; raise TargetUnavailable with a reason when the target cannot be reached."""

    def close(self) -> None: ...

    def alive(self) -> bool:
        """Is the connection still usable?"""

    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Transfer *items*; files become visible at the target only when complete.

        *dest* is a directory on the target to send into instead of the stream's target
        directory (the arrival monitor's batch directory)."""

    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        """Size and sha256 of each file at the target (absent = missing): under its final
        name, or (*staged* = a batch id) in that batch's staging directory
        (:func:`staging_dir`).  A directory is reported present with ``sha256=None``;
        nothing is ever followed through a symbolic link."""

    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        """Move the verified *items* of batch *staged* from its staging directory into
        place; returns {relpath: error} for the items that could not be published.

        A file item replaces a same-named file (a rename: atomic).  A directory item is
        *merged*: missing directories are created, each file (or link) it brings is
        renamed over a same-named non-directory, and nothing else in the target
        directory is touched; an entry whose type conflicts (a file where the target has
        a directory, a directory where it has a file, a link on the way) is an error for
        the item and is left as it is.  setuid, setgid and sticky bits never survive.
        The renames are durable at the target when this returns."""

    def discard(self, staged: str) -> None:
        """Remove what is left of batch *staged*'s staging directory (items that did not
        verify, leftovers); best effort, never following a link."""

    def put_file(self, directory: str, name: str, data: bytes) -> None:
        """Create *directory*/*name* on the target atomically (temporary name, rename)."""

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        """Wait for *directory*/*name* to appear on the target; its first *max_bytes*
        bytes, or None after *timeout* seconds (or when asked to stop)."""

    def stop_file_present(self) -> str | None:
        """A reason if the target asks senders to pause (its stop file), else None."""


def exchange(transport: Transport, directory: str, *, put: tuple[str, bytes], await_name: str,
             then_put: tuple[str, bytes], timeout: float, max_bytes: int,
             tick: Callable[[], None] | None = None,
             should_stop: ShouldStop | None = None) -> bytes | None:
    """The handshake in as few round trips as the transport allows: create *put*
    atomically, wait for *await_name* and return its content (None after *timeout*), and
    create *then_put* as soon as it appeared.

    A transport with a remote shell does it in one round trip (an `exchange` method);
    any other does put_file + await_file + put_file.
    """
    fast = getattr(transport, "exchange", None)
    if fast is not None:
        result: bytes | None = fast(directory, put=put, await_name=await_name,
                                    then_put=then_put, timeout=timeout, max_bytes=max_bytes,
                                    tick=tick, should_stop=should_stop)
        return result
    transport.put_file(directory, *put)
    got = transport.await_file(directory, await_name, timeout=timeout, max_bytes=max_bytes,
                               tick=tick, should_stop=should_stop)
    if got is not None:
        transport.put_file(directory, *then_put)
    return got
