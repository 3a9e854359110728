"""The programs mstm runs at a target, each a file of this package.

The Python programs (stdlib only, no mstm import, Python 3.4+: a target's python3 may be
Debian 9's, Ubuntu 16.04's, SLES 12's or CentOS 7's python34) are modules here -- importable,
so that the linters, strict mypy and the unit tests cover them -- and are shipped to a target
as text: ``python3 -I -c <text> args``, directly or from one of the shell scripts beside
them.  Each keeps its work in functions and runs only under ``if __name__ == "__main__":``.
Their types are comments (``# type: ...``), and ``typing`` is imported only under
``if MYPY:`` with ``MYPY = False``: mypy reads both, Python 3.4 (no typing module) neither.

* ``hasher.py``: sizes and sha256 of the named files (rsync_ssh's `inspect`);
  ``inspect.sh`` syncs the filesystem first and falls back to stat/sha256sum.
* ``stage.py``: open / publish / discard of a staging batch (rsync_ssh);
  ``stage.sh`` does the same with POSIX sh and GNU tools, ``run_stage.sh`` picks one.
* ``put.sh``, ``await.sh``, ``exchange.sh``: the arrival monitor's handshake files
  (rsync_ssh).
* ``stream_receiver.py``: one large file from stdin, hashed and flushed as it comes
  (stream.py).
* ``sftp_inspect.py``: sizes and sha256 over sftp's exec channel (sftp.py).
"""

from __future__ import annotations

import functools
from importlib.resources import files


@functools.cache
def program(name: str) -> str:
    """The text of the program *name* (a file of this package), as sent to a target."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
