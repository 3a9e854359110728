"""Pull streams: fetch a remote host's items home, as HPC ASSyncy's mxsync did.

A pull stream (``[data_stream] direction = pull``) lists ``[pull] source_dir`` on
``[outgoing] target_host`` and fetches each item (an entry directly inside it: a
directory or a regular file) into a local folder chosen by ordered ``map`` rules under
``[data_stream] directory``.  One cycle:

1. the done-ledger (:mod:`mstm.pull.ledger`) is read again (a person may have edited it);
2. one remote command lists the whole tree, NUL-separated (``find -printf``), so every
   item gets a signature: its number of entries, total bytes and newest mtime;
3. each item is selected (``item_pattern``, ``max_age_days``), checked (a name that
   could escape the destination, or that cannot be shown safely, is refused), and
   mapped to a folder (first rule that matches); items that map nowhere, or are refused,
   are reported once (event ``unmapped``) and remembered in the ledger;
4. items never done, or whose signature changed since they were done (ASSyncy fetched
   an item only once: its defect 1), are fetched, up to ``max_tasks`` at once, each by
   one rsync over the stream's ssh connection (ControlMaster), under a per-item lock so
   no item is ever fetched twice at once, not even by two processes (defect 3);
5. an item is done when its rsync exited 0 and a second rsync, ``--dry-run --checksum
   --itemize-changes``, finds nothing left to transfer: every file's content compared
   by checksum, never by size alone (defect 2).  If it finds something (a local file of
   the same size and time but other bytes), one more transfer with ``--checksum`` runs
   and is verified again.  Only then is the item written to the ledger (atomically,
   under a lock: defect 4).

A hung connection never holds a task slot (defect 5): ssh has ConnectTimeout and
ServerAlive, rsync ``--timeout``, the listing a deadline, and since rsync's own timeout
counts its keep-alives as traffic, each rsync run is watched: one whose processes read
nothing for ``stall_seconds`` (a checksum pass: plus a second per 50 MiB of the item) is
killed with its whole process group, and the item tried again next cycle.  No secret is
ever logged (defect 7): mstm knows none, only the key file's path.

Remote names are untrusted: they travel to rsync on stdin (``--files-from - --from0``,
never on a command line, never glob-expanded), and each local path is built from a
validated name (no '/', no leading '.', nothing unprintable, at most 255 bytes) and
checked to lie directly inside its folder.

Without ``execute`` a cycle only plans: it lists and shows what would be fetched where,
and changes nothing (no ledger, no folder, no lock file).

The package, by module:

* :mod:`~mstm.pull.listing`: the remote listing (:class:`RemoteItem`, ``listing_argv``,
  ``parse_listing``) and the checks of remote names (``refuse_name``, ``item_path``);
* :mod:`~mstm.pull.planning`: what a cycle decides for each item (``plan``, :class:`Mapper`,
  :class:`Planned`, the action and result names);
* :mod:`~mstm.pull.locks`: the per-item lock (:class:`ItemLock`);
* :mod:`~mstm.pull.ledger`: the done-ledger;
* :mod:`~mstm.pull.puller`: the :class:`Puller` (one cycle, the fetch and verify of an
  item, the follow loop); its rsync runs go through :mod:`mstm.transports.rsync`;
* :mod:`~mstm.pull.report`: what a cycle did (:class:`CycleReport`) and how it is told;
* :mod:`~mstm.pull.command`: ``run_command``, mstm-send's body for a pull stream.
"""

from __future__ import annotations

from mstm.pull.command import run_command
from mstm.pull.listing import (
    ListingError,
    RemoteItem,
    item_path,
    listing_argv,
    parse_listing,
    refuse_name,
)
from mstm.pull.locks import ItemLock
from mstm.pull.planning import (
    FETCH,
    IGNORED,
    REFETCH,
    REFUSED,
    TOO_OLD,
    UNMAPPED_ITEM,
    UP_TO_DATE,
    Mapper,
    plan,
)
from mstm.pull.puller import Puller
from mstm.pull.report import CycleReport

__all__ = [
    "FETCH", "IGNORED", "REFETCH", "REFUSED", "TOO_OLD", "UNMAPPED_ITEM", "UP_TO_DATE",
    "CycleReport", "ItemLock", "ListingError", "Mapper", "Puller", "RemoteItem",
    "item_path", "listing_argv", "parse_listing", "plan", "refuse_name", "run_command",
]
