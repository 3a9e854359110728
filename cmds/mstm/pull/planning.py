"""What a pull cycle decides for each remote item, and where a fetched item goes.

:class:`Mapper` holds the ordered ``[pull] map`` rules; :func:`plan` gives each listed
item an action (the first constants below) and, for those to be fetched, its folder;
a :class:`Planned` item later also holds what happened when it was fetched (the
second constants).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mstm.config import StreamConfig
from mstm.pull.ledger import DONE, UNMAPPED, Entry
from mstm.pull.listing import RemoteItem, item_path, refuse_name
from mstm.send import json_path

# What a cycle decides for each remote item
FETCH = "fetch"  # never done
REFETCH = "refetch"  # done, but its signature changed since
UP_TO_DATE = "up_to_date"
UNMAPPED_ITEM = "unmapped"  # no map rule matches
REFUSED = "refused"  # a name or kind that is never fetched
TOO_OLD = "too_old"  # older than max_age_days
IGNORED = "ignored"  # does not match item_pattern
ACTIONS = (FETCH, REFETCH, UP_TO_DATE, UNMAPPED_ITEM, REFUSED, TOO_OLD, IGNORED)

# What happened to an item that was to be fetched
FETCHED = "fetched"
FAILED = "failed"
BUSY = "busy"  # another worker holds its lock
STOPPED = "stopped"
ALREADY_DONE = "already_done"  # another worker finished it meanwhile
CHANGING = "changing"  # still being written at the source: tried again next cycle


class Mapper:
    """[pull] map: ordered (regex, folder) rules; the first whose regex is found wins."""

    def __init__(self, rules: Sequence[tuple[str, str]], root: Path) -> None:
        self.root = root
        self.rules = [(re.compile(pattern), self._folder(dest)) for pattern, dest in rules]

    def _folder(self, dest: str) -> Path:
        return Path(os.path.normpath(dest if dest.startswith("/") else self.root / dest))

    def folder(self, name: str) -> Path | None:
        if not self.rules:
            return self.root
        for pattern, folder in self.rules:
            if pattern.search(name):
                return folder
        return None


@dataclass
class Planned:
    item: RemoteItem
    action: str
    folder: Path | None = None
    reason: str = ""
    reported: bool = False  # unmapped/refused: already in the ledger
    result: str | None = None  # after fetching: FETCHED, FAILED, ...
    moved_bytes: int = 0

    @property
    def target(self) -> Path | None:
        return item_path(self.folder, self.item.raw) if self.folder is not None else None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {**json_path(self.item.name), "action": self.action}
        target = self.target if self.action in (FETCH, REFETCH, UP_TO_DATE) else None
        obj["destination"] = str(target) if target else None
        if self.reason:
            obj["reason"] = self.reason
        if self.action in (UNMAPPED_ITEM, REFUSED):
            obj["reported_before"] = self.reported
        if self.result:
            obj["result"] = self.result
            obj["bytes"] = self.moved_bytes
        obj["signature"] = self.item.signature
        return obj


def plan(stream: StreamConfig, items: Sequence[RemoteItem], ledger: dict[str, Entry],
         *, now: float | None = None) -> list[Planned]:
    cfg = stream.pull
    pattern = re.compile(cfg.item_pattern)
    mapper = Mapper(cfg.map, stream.directory)
    oldest = ((now if now is not None else time.time()) - cfg.max_age_days * 86400
              if cfg.max_age_days else None)
    out: list[Planned] = []
    for it in items:
        name = it.name
        entry = ledger.get(name)
        reported = entry is not None and entry.state == UNMAPPED
        if not pattern.search(name):
            out.append(Planned(it, IGNORED, reason="does not match item_pattern"))
            continue
        refused = refuse_name(it.raw)
        if refused is None and it.kind not in ("d", "f"):
            refused = ("a symbolic link" if it.kind == "l" else
                       f"not a directory or regular file (type {it.kind or '?'})")
        if refused:
            out.append(Planned(it, REFUSED, reason=refused, reported=reported))
            continue
        if oldest is not None and it.mtime < oldest:
            out.append(Planned(it, TOO_OLD, reason=f"unchanged for more than"
                               f" {cfg.max_age_days} days"))
            continue
        done = entry is not None and entry.state == DONE
        folder = mapper.folder(name)
        if done and entry is not None and (entry.signature is None
                                           or entry.signature == it.signature):
            out.append(Planned(it, UP_TO_DATE, folder=folder,
                               reason="marked done for good" if entry.signature is None
                               else ""))
            continue
        if folder is None:
            out.append(Planned(it, UNMAPPED_ITEM, reason="no [pull] map rule matches",
                               reported=reported))
            continue
        if done and entry is not None:
            out.append(Planned(it, REFETCH, folder=folder,
                               reason=f"changed since it was done ({entry.signature} ->"
                                      f" {it.signature})"))
        else:
            out.append(Planned(it, FETCH, folder=folder))
    return out
