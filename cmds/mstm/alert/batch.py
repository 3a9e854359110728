"""Events gathered for one mail: alike events (:func:`dedup_key`) shown once, counted.

Some events are there for their items: a pull item that maps to no project (or whose
name is refused) needs a person to act on each one, which is why HPC ASSyncy had a
program of its own, epnalert, to mail them.  Events in :data:`NAMED_EVENTS` are still
gathered into one group per stream and reason, but the group names every item, up to
:data:`MAX_NAMED_ITEMS` per group, then says how many more there are; it is not left
out for :data:`MAX_GROUPS`, but has :data:`MAX_NAMED_GROUPS` more room of its own (on the
--stdin path the reason is any text a line holds: never a group per line).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mstm.alert.events import Alert
from mstm.log import MESSAGE_IDS

MAX_GROUPS = 100  # distinct kinds of event shown in one mail; the rest are counted
MAX_ITEMS = 10  # item names listed per group
NAMED_EVENTS = frozenset({"unmapped"})  # every item named (see the module docstring)
MAX_NAMED_ITEMS = 1000  # item names listed per group of NAMED_EVENTS; the rest counted
MAX_NAMED_GROUPS = 100  # groups of NAMED_EVENTS beyond MAX_GROUPS (their reason may be any
#                         text on the --stdin path: never a group per line)
MAX_SEEN = 10 * MAX_NAMED_ITEMS  # names remembered per group to count each item once
_NAMED_IDS = frozenset(MESSAGE_IDS[e] for e in NAMED_EVENTS)


def is_named(a: Alert) -> bool:
    """Whether each item of *a*'s kind must be named in the mail."""
    return a.event in NAMED_EVENTS or a.message_id in _NAMED_IDS


def dedup_key(a: Alert) -> tuple[str, ...]:
    """What makes two events "alike": program, stream, event, priority and the message
    with the item's name and every number blanked out."""
    text = a.reason or a.message
    if a.item:
        text = text.replace(a.item, "\0")
    text = re.sub(r"\d+", "#", text)
    return (a.identifier, a.stream or "", a.event or a.message_id or "", str(a.priority), text)


@dataclass
class Group:
    """Alike events: the first and the last, how many, and the items they were about."""

    first: Alert
    last: Alert
    count: int = 1
    items: list[str] = field(default_factory=list)
    more_items: int = 0
    named: bool = False  # a kind of NAMED_EVENTS: the mail lists every item
    seen: set[str] = field(default_factory=set, repr=False)

    @property
    def more(self) -> int:
        return self.count - 1

    @property
    def priority_name(self) -> str:
        return self.first.priority_name


@dataclass
class Batch:
    """Events gathered for one mail."""

    groups: dict[tuple[str, ...], Group] = field(default_factory=dict)
    total: int = 0
    overflow: int = 0
    opened: float = 0.0  # clock() when the first event came
    clock: Callable[[], float] = time.monotonic

    def __bool__(self) -> bool:
        return self.total > 0

    def add(self, a: Alert) -> None:
        if not self.total:
            self.opened = self.clock()
        self.total += 1
        key = dedup_key(a)
        g = self.groups.get(key)
        if g is None:
            named = is_named(a)
            if len(self.groups) >= MAX_GROUPS + (MAX_NAMED_GROUPS if named else 0):
                self.overflow += 1
                return
            g = self.groups[key] = Group(a, a, 0, named=named)
        g.count += 1
        g.last = a
        if a.item and a.item not in g.seen:
            if len(g.seen) < MAX_SEEN:  # past it an item seen twice may be counted twice
                g.seen.add(a.item)
            if len(g.items) < (MAX_NAMED_ITEMS if g.named else MAX_ITEMS):
                g.items.append(a.item)
            else:
                g.more_items += 1

    def ordered(self) -> list[Group]:
        return sorted(self.groups.values(), key=lambda g: (g.first.priority, g.first.time))
