"""Free-space levels, stop files in priority order, and safe deletion when space is very low.

mstm-diskwatch looks at the file system of every place a stream's stop file lives: the
stream's ``directory`` (where ``[outgoing] stop_file`` pauses the local sender, and remote
senders that deliver into it without the arrival monitor) and, on a receiving host, its
incoming area (``[incoming] incoming_dir``, if that directory exists here; its
``[incoming] stop_file`` pauses remote senders using the arrival monitor).  Each file system gets
a level from its free space (``f_bavail``: what unprivileged writers can still use):

    GOOD   free > level_good
    OKAY   level_low <= free <= level_good
    LOW    level_vlow <= free < level_low
    VLOW   free < level_vlow

Levels are megabytes (MiB, 1048576 bytes) or "N%" of the file system's size.

**Hysteresis.**  A level falls at once but rises only when free space is above the
boundary by ``hysteresis`` (MB or N%); and the actions themselves have a gap: a stream
paused at LOW resumes only at GOOD, one paused at VLOW resumes at OKAY.  A file system
hovering at a threshold therefore neither flaps its level nor its streams.

**Stop files.**  At LOW every stream with ``priority <= base_priority`` is paused, lowest
priority first; at VLOW every stream on that file system is.  A stop file is created
with O_EXCL (an existing one, an operator's, is never overwritten); its first line says
who placed it and why ("mstm-diskwatch: disk space LOW on /data (812 MB free)"), which
mstm-send quotes when it pauses.  Each one placed is recorded, with its inode and first
line, in ``<spool_base_dir>/.mstm-diskwatch.json``; only a file that is still exactly the
one recorded is ever removed, so an operator's stop file is never touched, not even one
written over ours.

**Deletion at VLOW** (only streams with ``deletion_enabled = true``, lowest priority
first, each stream's items oldest first, until free space is back above level_vlow plus
the hysteresis):

1. items that are safe: their ``done/`` record in the stream's spool says a copy with
   exactly this size and mtime was verified at the target (move mode: the sender had not
   deleted the source yet; mirror mode: delivered copies);
2. only with ``delete_undelivered = true``: any other item, delivered or not.

Nothing else is ever deleted (MiStaMover deleted the newest items first without asking
whether they had been delivered).  Paths are walked with O_NOFOLLOW from the stream's
directory, so a symlinked directory cannot lead the deletion elsewhere; symbolic links
are never deleted (that frees nothing).  Each deletion is logged as a
``diskwatch_deleted`` event; each level change as ``disk_level``.

Which module holds what:

* :mod:`~mstm.diskwatch.levels`: the file systems, their usage, :class:`Level` and the
  :class:`Thresholds` with their hysteresis;
* :mod:`~mstm.diskwatch.stopfiles`: each stream's stop files (:func:`targets_of`), when
  one is wanted, placing one, telling ours from an operator's;
* :mod:`~mstm.diskwatch.candidates`: what may be deleted at VLOW, and deleting it;
* :mod:`~mstm.diskwatch.report`: the :class:`Report` of one check and
  :func:`status_line`;
* :mod:`~mstm.diskwatch.watch`: :class:`DiskWatch`, one check of everything, its state
  file, and :func:`load_streams`.
"""

from mstm.diskwatch.levels import MIB, Level, Thresholds, Usage
from mstm.diskwatch.report import Report, status_line
from mstm.diskwatch.stopfiles import targets_of
from mstm.diskwatch.watch import STATE_FILE, DiskWatch, load_streams

__all__ = [
    "MIB",
    "STATE_FILE",
    "DiskWatch",
    "Level",
    "Report",
    "Thresholds",
    "Usage",
    "load_streams",
    "status_line",
    "targets_of",
]
