"""Owners and leases: which sender holds a claim, and when its claims may be taken over.

An owner is named "<host>.<pid>.<random>" and registered as the file owners/<owner>
(its JSON holds the pid's start time, to tell a reused pid); a claim is the name
claimed/<id>@<owner>.  Leases keeps our own owner file beating and, under spool.lock
held exclusively by the caller, takes over the claims of dead or silent owners.

Leases and clocks: all times come from the injected clock.  A heartbeat sets the owner
file's mtime to now, but never moves it backwards (a backward clock step can't make a
live lease look old; a mark left in the future by a corrected forward step is clamped to
now + lease_seconds).  An owner on this host is judged by its pid alone (authoritative:
dead, zombie or reused pid -> taken over at once; alive -> never, however old its
heartbeat, so a forward clock step can't steal live local claims; a hung sender is the
watchdog's to kill; "this host" means the same hostname, so senders in different pid
namespaces sharing a spool need different hostnames).  An owner on another host is taken
over when its heartbeat is older than lease_seconds by our clock; a forward step may
expire such owners early, which costs a second transfer but never a second completion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable

import psutil

from mstm.log import event
from mstm.smallfiles import read_small
from mstm.spool.errors import SpoolError
from mstm.spool.files import SpoolFiles, fsync_dir, listdir, parse_seconds, rename_if_present
from mstm.spool.records import ID_RE

log = logging.getLogger("mstm.spool")

EXPIRED_MAX_AGE = 3600.0  # seconds an owners/*.expired-* marker is kept
_EXPIRED = ".expired-"


# ---------------------------------------------------------------------------- owner names


def safe_host(name: str) -> str:
    """A host name as it may stand in an owner name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "localhost"


def valid_owner(owner: str) -> bool:
    """Whether owner may name an owner file and stand after the "@" of a claim."""
    return not (
        not owner
        or len(owner) > 200
        or owner.startswith(".")
        or _EXPIRED in owner
        or any(c in owner for c in "/@\0")
    )


def _parse_owner(owner: str) -> tuple[str, int | None]:
    """(host, pid) of "<host>.<pid>.<random>"; pid None if the name has another shape."""
    parts = owner.rsplit(".", 2)
    if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) > 0:
        return parts[0], int(parts[1])
    return owner, None


# ---------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", -1) if psutil.pid_exists(pid) else None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode("ascii", "replace"), int(fields[19])


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    if not os.path.exists("/proc/self/stat"):
        return psutil.pid_exists(pid)
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X", "x"):
        return False
    # The same pid with another start time is a new process (pid reuse).
    return start_ticks is None or st[1] < 0 or st[1] == start_ticks


# ---------------------------------------------------------------------------- leases


class Leases:
    """The owners/ directory of one spool: our owner file (registered, beaten, replaced
    by a new identity once lost) and the takeover of other owners' expired claims."""

    def __init__(self, files: SpoolFiles, *, owner: str | None, lease_seconds: float,
                 clock: Callable[[], float]) -> None:
        self._files = files
        self.lease_seconds = lease_seconds
        self._clock = clock
        self.host = safe_host(socket.gethostname())
        self.owner = owner if owner is not None else self._new_owner_name()
        if not valid_owner(self.owner):
            raise ValueError(f"bad owner name: {self.owner!r}")
        self._mutex = threading.Lock()  # owner identity and lease flag
        self._lost_owner: str | None = None  # set when our owner file was taken away
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()

    def _new_owner_name(self) -> str:
        return f"{self.host}.{os.getpid()}.{secrets.token_hex(4)}"

    def owner_path(self, owner: str | None = None) -> str:
        """owners/<owner>, ours by default."""
        return os.path.join(self._files.owners, owner if owner is not None else self.owner)

    def register(self) -> None:
        """Write our owner file (pid, its start time, when opened)."""
        host, pid = _parse_owner(self.owner)
        st = _proc_stat(pid) if pid is not None and pid == os.getpid() else None
        info = {
            "owner": self.owner,
            "host": host,
            "pid": pid,
            "start_ticks": st[1] if st else None,
            "opened_at": self._clock(),
        }
        data = (json.dumps(info) + "\n").encode()
        try:
            tmp = self._files.write_tmp(data, self.owner, mtime=self._clock())
            os.rename(tmp, self.owner_path())
            fsync_dir(self._files.owners)
        except OSError as e:
            raise SpoolError(f"cannot register owner in {self._files.owners}: {e}") from e

    def heartbeat(self) -> bool:
        """Touch owners/<owner>; False if it was taken away (lease lost)."""
        with self._mutex:
            owner = self.owner
            if self._lost_owner == owner:
                return False
        path = self.owner_path(owner)
        now = self._clock()
        try:
            old = os.stat(path).st_mtime
            mark = max(now, min(old, now + self.lease_seconds))
            ns = int(mark * 1e9)
            os.utime(path, ns=(ns, ns))
        except FileNotFoundError:
            with self._mutex:
                if self.owner == owner:
                    self._lost_owner = owner
            log.warning(
                "spool %s: lease of %s lost (owner file taken away); its claims "
                "belong to whoever took them over",
                self._files.path,
                owner,
            )
            return False
        except OSError as e:
            raise SpoolError(f"heartbeat {path}: {e}") from e
        return True

    def lost(self, *, look: bool) -> bool:
        """True once our owner file was taken away (until ensure() starts a new
        identity); look: whether to look for the file (not while the spool is closed)."""
        with self._mutex:
            owner = self.owner
            if self._lost_owner == owner:
                return True
        if not look or os.path.lexists(self.owner_path(owner)):
            return False
        with self._mutex:
            if self.owner == owner:
                self._lost_owner = owner
        return True

    def ensure(self) -> None:
        """Beat; if the lease was lost, go on as a new owner (registered at once)."""
        if self.heartbeat():
            return
        with self._mutex:
            old, self.owner = self.owner, self._new_owner_name()
            self._lost_owner = None
        self.register()
        log.warning(
            "spool %s: continuing as new owner %s after losing the lease of %s",
            self._files.path,
            self.owner,
            old,
        )

    def start_heartbeat(self) -> None:
        """Beat every lease_seconds/4 in a daemon thread.

        Not a RunLoop: this thread must not feed the systemd watchdog (a hung sender
        whose heartbeat still beats is the watchdog's to kill).
        """
        if self._hb_thread is not None and self._hb_thread.is_alive():
            return
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(
            target=self._beat_forever, name="mstm-spool-heartbeat", daemon=True
        )
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread, if any (waits up to 10 s for it)."""
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=10)
            self._hb_thread = None

    def _beat_forever(self) -> None:
        while not self._hb_stop.wait(self.lease_seconds / 4):
            try:
                self.heartbeat()
            except Exception:
                log.exception("spool %s: heartbeat failed", self._files.path)

    def _expired(self, owner: str, now: float, expired_markers: set[str]) -> str | None:
        """Why owner's claims may be taken over, or None if it is alive."""
        host, pid = _parse_owner(owner)
        path = self.owner_path(owner)
        try:
            mtime: float | None = os.stat(path).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime is None and owner in expired_markers:
            return "takeover already begun"
        if host == self.host and pid is not None:
            start_ticks = None
            if mtime is not None:
                with contextlib.suppress(OSError, ValueError):
                    with open(path, "rb") as f:
                        info = json.loads(f.read(4096))
                    if isinstance(info, dict) and isinstance(info.get("start_ticks"), int):
                        start_ticks = info["start_ticks"]
            return None if _pid_alive(pid, start_ticks) else f"process {pid} is gone"
        if mtime is None:
            return "no owner file"
        if mtime < now - self.lease_seconds:
            return f"no heartbeat for {now - mtime:.0f}s"
        return None

    def take_over_expired(self, now: float) -> int:
        """Move the claims of dead or silent owners back to new/; how many moved.

        The caller holds spool.lock exclusively and fsyncs the directories.  Claim names
        that are not <id>@<owner> are quarantined; expired-owner markers older than
        EXPIRED_MAX_AGE, with no claims left, are deleted.
        """
        files = self._files
        moved = 0
        claims: dict[str, list[str]] = {}
        for name in listdir(files.claimed):
            item, sep, owner = name.partition("@")
            if not sep or not valid_owner(owner) or not ID_RE.fullmatch(item):
                files.quarantine(os.path.join(files.claimed, name), "claimed", "not <id>@<owner>")
                continue
            claims.setdefault(owner, []).append(item)
        owner_files: set[str] = set()
        markers: dict[str, tuple[str, float | None]] = {}
        for name in listdir(files.owners):
            base, sep, stamp = name.partition(_EXPIRED)
            if sep:
                markers[name] = (base, parse_seconds(stamp))
            elif not name.startswith("."):
                owner_files.add(name)
        marked = {base for base, _ in markers.values()}
        for owner in sorted(set(claims) | owner_files):
            if owner == self.owner:
                continue
            why = self._expired(owner, now, marked)
            if why is None:
                continue
            # The owner file goes first: a slow but living owner then sees it lost.
            marker = f"{owner}{_EXPIRED}{int(now)}"
            if rename_if_present(self.owner_path(owner), self.owner_path(marker)):
                markers[marker] = (owner, float(int(now)))
            n = 0
            for item in claims.get(owner, []):
                if rename_if_present(
                    os.path.join(files.claimed, f"{item}@{owner}"),
                    os.path.join(files.new, item),
                ):
                    n += 1
            if n:
                log.warning(
                    "spool %s: took over %d claim(s) of %s (%s)",
                    files.path,
                    n,
                    owner,
                    why,
                    extra=event("lease_taken_over", reason=why),
                )
            claims.pop(owner, None)
            moved += n
        for name, (base, when) in markers.items():
            if base not in claims and (when is None or when < now - EXPIRED_MAX_AGE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.owner_path(name))
        return moved


# ---------------------------------------------------------------------------- read only


def live_owners(owners_dir: str, *, lease_seconds: float, now: float) -> list[str]:
    """The owners registered in *owners_dir* that look alive, judged as a takeover
    would judge them (a local pid that still runs; another host's heartbeat younger than
    lease_seconds); read only: nothing is renamed, created or touched (for --status)."""
    host = safe_host(socket.gethostname())
    alive: list[str] = []
    for name in sorted(listdir(owners_dir)):
        if name.startswith(".") or _EXPIRED in name or not valid_owner(name):
            continue
        path = os.path.join(owners_dir, name)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        owner_host, pid = _parse_owner(name)
        if owner_host == host and pid is not None:
            start_ticks = None
            with contextlib.suppress(OSError, ValueError):
                # never blocks on a FIFO nor follows a link the spool's owner planted
                info = json.loads(read_small(path, 4096))
                if isinstance(info, dict) and isinstance(info.get("start_ticks"), int):
                    start_ticks = info["start_ticks"]
            if _pid_alive(pid, start_ticks):
                alive.append(name)
        elif mtime >= now - lease_seconds:
            alive.append(name)
    return alive
