"""The target's word on a batch: what it holds, checked against what we hashed.

Two ways, one per kind of target:

* :func:`handshake` -- with mstm-receive (or MiStaMover's arrival monitor) at the
  target: a control file listing every file's size and sha256, the receiver's receipt,
  then a thank-you (docs/mstm-protocol.7);
* :func:`inspect_staged` -- without a receiver: the transport reports size and sha256
  of every file of the batch in its staging directory, before anything is published.

Both return ``{item id: the first problem}`` for the items that did not verify; an item
absent from the answer verified.  A digest that is a string (the source could not be
read) or ``changed`` is not asked about: the sender settles it on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from mstm import protocol
from mstm.config import OutgoingConfig
from mstm.errors import TargetUnavailable
from mstm.log import show
from mstm.send.digests import LocalDigest, compare
from mstm.spool import Claim
from mstm.transports.base import Transport, exchange

#: The largest receipt read from a target (it is untrusted input).
MAX_RECEIPT = 64 << 20

Digests = Mapping[str, "LocalDigest | str"]


def _trusted(live: Sequence[Claim], digests: Digests) -> list[tuple[Claim, LocalDigest]]:
    """The claims whose digest is usable: read, and unchanged while it was read."""
    return [(c, d) for c in live if isinstance(d := digests[c.record.id], LocalDigest)
            and not d.changed]


def inspect_staged(transport: Transport, batch: str, live: Sequence[Claim],
                   digests: Digests) -> dict[str, str]:
    """Without a receiver: ask the target for size and sha256 of every file of the
    batch in its staging directory (and that each empty directory is there)."""
    trusted = _trusted(live, digests)
    wanted = [rel for _, d in trusted for rel in (*d.files, *d.dirs)]
    remote = transport.inspect(wanted, staged=batch) if wanted else {}
    return {c.record.id: p for c, d in trusted if (p := compare(d, remote))}


def handshake(transport: Transport, out: OutgoingConfig, batch: str, live: Sequence[Claim],
              digests: Digests, *, tick: Callable[[], None],
              should_stop: Callable[[], bool]) -> dict[str, str]:
    """With mstm-receive at the target: control file, receipt, thank-you.

    The receipt is untrusted input: parsed strictly, and an item counts as delivered
    only if the receipt says "ok" for every one of its files.  A receipt that never
    comes means the receiver is not working: TargetUnavailable, so the batch is
    released, not failed.
    """
    control_name, receipt_name, thanks_name = protocol.file_names(
        batch, control_ext=out.control_file_extension,
        receipt_ext=out.receipt_file_extension, thanks_ext=out.thankyou_file_extension)
    trusted = _trusted(live, digests)
    entries = tuple(protocol.ControlItem(rel, size, digest)
                    for _, d in trusted for rel, (size, digest) in d.files.items())
    dirs = tuple(rel for _, d in trusted for rel in d.dirs)
    # a control file even for an empty batch: its thank-you lets the receiver clean up.
    # The thank-you goes as soon as the receipt exists (one round trip for it all): if
    # we then fail to read the receipt, nothing is deleted here and a re-send finds the
    # items already published, identical, and gets "ok".
    control = protocol.Control(batch=batch, algorithm="sha256", receipt=receipt_name,
                               items=entries, dirs=dirs)
    timeout = out.receipt_file_poll_count * out.receipt_file_poll_interval
    try:
        raw = exchange(
            transport, out.target_incoming_dir,
            put=(control_name, protocol.render_control(control)),
            await_name=receipt_name, then_put=(thanks_name, protocol.render_thanks(batch)),
            timeout=timeout, max_bytes=MAX_RECEIPT, tick=tick, should_stop=should_stop)
    except OSError as err:
        raise TargetUnavailable(str(err)) from err
    if raw is None:
        if should_stop():
            raise TargetUnavailable("stopped while waiting for the receipt")
        raise TargetUnavailable(f"no receipt from the target's mstm-receive within "
                                f"{timeout:.0f} s (is it running?)")
    try:
        receipt = protocol.parse_receipt(raw, batch=batch)
    except protocol.ProtocolError as err:
        raise TargetUnavailable(f"unreadable receipt for batch {batch}: {err}") from err
    status = dict(receipt.items)
    problems: dict[str, str] = {}
    for c, d in trusted:
        for rel in (*d.files, *d.dirs):
            st = status.get(rel)
            if st is not protocol.Status.OK:
                what = st.value if st is not None else "no answer"
                problems[c.record.id] = f"receipt says {what}: {show(rel)}"
                break
    return problems
