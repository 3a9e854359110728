"""Scenario 6, clock jumps: the system time steps forwards and backwards (faked through
the spool's injectable clock, each owner with a clock of its own) while four owners
claim, complete, retry, release, beat and take over on one spool.

Two owners are on this host (judged by pid: they must never lose a lease, whatever any
clock says); two are "on other hosts" (judged by heartbeat age), and fall silent now and
then, so their claims are taken over and their late completions must be refused.  At
the end every item is in done/ exactly once, was completed exactly once, and no record
is in two states.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from tests.harness.audit import AuditResult, emit_line
from tests.torture.rig import PROFILE

from mstm.spool import Claim, ItemRecord, Spool

LEASE = 30.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t
        self.jumps = 0

    def __call__(self) -> float:
        return self.t

    def step(self, rng: random.Random) -> None:
        if rng.random() < 0.08:  # a step of the system time, either way
            self.jumps += 1
            self.t += rng.choice([-1, 1]) * rng.choice([5, 60, 3600, 86400, 7 * 86400])
        else:
            self.t += rng.uniform(0, 2)


@pytest.mark.parametrize("remote", [False, True], ids=["this-host", "with-other-hosts"])
def test_clock_jumps_forwards_and_backwards_lose_no_lease_and_no_item(tmp_path: Path,
                                                                      remote: bool) -> None:
    """this-host: two senders on this host, each clock jumping on its own: no lease is
    ever lost, no completion refused.  with-other-hosts: two more owners on "other
    hosts" (a spool shared over NFS), judged by heartbeat age; a forward step may expire
    a lease early (documented: a second transfer, never a second completion)."""
    rng = random.Random(PROFILE.seed + 600 + remote)
    root = tmp_path / "spool"
    n = PROFILE.clock_items
    base = 1_900_000_000.0
    names = ["local-a", "local-b"] + (["remote-1", "remote-2"] if remote else [])
    clocks = {k: Clock(base) for k in names}
    spools = {k: Spool(root, lease_seconds=LEASE, clock=clocks[k],
                       owner=f"else{k[-1]}.4242.0badf00d" if k.startswith("remote") else None
                       ).open() for k in names}
    for k, sp in spools.items():
        if k.startswith("remote"):
            # another host: a new identity after a lost lease is named after it, and it
            # judges the owners of this host by heartbeat age
            sp._leases.host = f"else{k[-1]}"
    records = [ItemRecord(relpath=f"c/{i:05d}.dat", size=i, mtime_ns=i) for i in range(n)]
    assert spools["local-a"].enqueue(records) == n
    held: dict[str, list[Claim]] = {k: [] for k in spools}
    completed: Counter[str] = Counter()
    refused = Counter[str]()
    silent: dict[str, int] = {}
    local_refusals = 0
    takeovers = 0
    for _step in range(PROFILE.clock_steps):
        who = rng.choice(list(spools))
        s, clock = spools[who], clocks[who]
        clock.step(rng)
        for k in ("local-a", "local-b"):  # a live local sender beats all the time
            spools[k].heartbeat()
        if who.startswith("remote") and silent.get(who, 0) > 0:
            silent[who] -= 1  # a remote owner that stopped beating (hung or cut off)
            continue
        if who.startswith("remote") and rng.random() < 0.05:
            silent[who] = rng.randrange(5, 40)
        action = rng.random()
        if action < 0.3 or not held[who]:
            s.heartbeat()
            held[who] += s.claim(max_items=rng.randrange(1, 15), max_bytes=10**12)
        elif action < 0.75:
            for c in held[who][: rng.randrange(1, 6)]:
                held[who].remove(c)
                if s.complete(c, sha256="0" * 64):
                    completed[c.record.id] += 1
                else:
                    refused[who] += 1
                    if who.startswith("local"):
                        local_refusals += 1
        elif action < 0.85:
            c = held[who].pop(rng.randrange(len(held[who])))
            s.retry(c, "torture: transfer failed", retry_count=1000, backoff=1,
                    backoff_max=5)
        elif action < 0.9:
            c = held[who].pop(rng.randrange(len(held[who])))
            s.release(c)
        else:
            takeovers += s.reclaim_expired()
        if who.startswith("local") and not remote:
            assert not s.lease_lost(), f"{who} (a live local sender) lost its lease"
    # the end: time runs on (every clock far past any backoff); the local owners finish
    end = max(c.t for c in clocks.values()) + 30 * 86400
    for c in clocks.values():
        c.t = end
    a = spools["local-a"]
    for who, claims in held.items():  # the remote owners are gone: their claims are taken
        if who.startswith("local"):
            spools[who].heartbeat()
            for c in claims:
                if spools[who].complete(c, sha256="0" * 64):
                    completed[c.record.id] += 1
    takeovers += a.reclaim_expired()
    for _ in range(n):
        claims = a.claim(max_items=100, max_bytes=10**12)
        if not claims:
            break
        for c in claims:
            if a.complete(c, sha256="0" * 64):
                completed[c.record.id] += 1
    states: Counter[str] = Counter()
    where: dict[str, list[str]] = {}
    for state in ("new", "claimed", "done", "failed"):
        for name in (root / state).iterdir():
            where.setdefault(name.name.partition("@")[0], []).append(state)
            states[state] += 1
    ids = {r.id for r in records}
    res = AuditResult("clock", items=n)
    res.delivered = sum(1 for i in ids if where.get(i) == ["done"])
    res.failed_kept = sum(1 for i in ids if where.get(i) in (["new"], ["failed"], ["claimed"]))
    res.parked = states["failed"]
    res.lost = sum(1 for i in ids if i not in where)
    res.duplicated = sum(1 for i in ids if len(where.get(i, [])) > 1) + \
        sum(1 for i in ids if completed[i] > 1)
    res.scenario = f"clock-{'other-hosts' if remote else 'this-host'}"
    res.extra = {"steps": PROFILE.clock_steps,
                 "clock-jumps": sum(c.jumps for c in clocks.values()),
                 "takeovers": takeovers, "late-completions-refused": sum(refused.values()),
                 "seed": PROFILE.seed + 600 + remote}
    for i in ids:
        if where.get(i) != ["done"]:
            res.details.append(f"not done: {i} in {where.get(i)}: " + ", ".join(
                p.name for st in ("new", "claimed", "failed") for p in (root / st).glob(i + "*")))
    res.details.append(f"owners: {sorted(p.name for p in (root / 'owners').iterdir())}")
    res.details.append(f"us: { {k: s.owner for k, s in spools.items()} }")
    emit_line(res.line())
    if not remote:
        assert local_refusals == 0, "a live local sender's completion was refused"
    res.check(all_delivered=True, no_leftovers=False)
    assert all(completed[i] == 1 for i in ids)
