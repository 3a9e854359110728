"""Alerts by email: journal events gathered into one mail, and the OnFailure= mail.

``mstm-alert --follow`` reads the journal for mstm's entries (those with an MSTM_STREAM
field, or from an ``mstm-*`` program or unit; mstm-alert's own are left out, so that a
mail server that is down cannot feed alerts about itself) at or above ``[email]
threshold``.  The first such entry opens a batch; ``[logging] email_timer`` seconds
later the batch becomes one message per recipient.  Repeats (the same program, stream,
event and message, numbers and the item's name aside) are shown once, with "N more like
this" and the items they were about.

Nothing is mailed twice and nothing is skipped:

* a closed batch is written to the outbox (see :mod:`mstm.alert.mailer`) *before* the journal
  cursor is saved (``<state_dir>/alert.cursor``, written atomically);
* the cursor saved is that of the last entry read, and it is saved only when every entry
  up to it is either in the outbox or below the threshold; after a restart reading
  resumes right after it (an open batch is simply gathered again);
* mail leaves the outbox only when the SMTP server has taken it; when it is down the
  outbox is tried again with exponential backoff, and meanwhile new batches queue up.

The one window left: a crash between writing the outbox and saving the cursor mails that
batch twice after the restart.  On the first start (no cursor) reading begins at the end
of the journal: old history is not mailed.

``mstm-alert UNIT`` (``mstm-alert@UNIT.service``, started by ``OnFailure=``) mails that
UNIT failed, with the last lines logged by the failed run: its invocation ID comes from
``systemctl show`` (system manager, then the user's) or, failing that, from the newest
``_SYSTEMD_INVOCATION_ID`` in the journal.

``mstm-alert --stdin`` reads events as JSON lines (``journalctl -o json`` output, or
objects with ``message``, ``priority``/``level``, ``stream``, ``item``, ``event``,
``identifier``, ``time``) or plain log lines (``tool: level: text``) from stdin, for
shell pipelines and cron; what it could not send waits in the outbox for the next run.

Messages are rendered from Jinja2 templates, text and HTML: ``alert.subject``,
``alert.txt``, ``alert.html``, ``failure.subject``, ``failure.txt``, ``failure.html``.
A file of the same name in ``[email] template_dir`` replaces the built-in one.

Which module holds what:

* :mod:`~mstm.alert.events`: :class:`Alert`, one event, read from a journal entry
  (:func:`from_entry`), a JSON object or a log line (:func:`from_line`); priorities;
  :func:`is_mstm`;
* :mod:`~mstm.alert.batch`: :class:`Batch`, the events gathered for one mail, alike ones
  (:func:`dedup_key`) shown once;
* :mod:`~mstm.alert.compose`: the :class:`Templates` and the messages made from them;
* :mod:`~mstm.alert.postman`: the state directory, the journal cursor
  (:class:`CursorStore`), the outbox lock, and the :class:`Postman` that posts into the
  outbox and delivers it with backoff;
* :mod:`~mstm.alert.mailer`: the SMTP connection, the password and the outbox itself;
* :mod:`~mstm.alert.follow`: ``--follow`` (:class:`JournalSource`, :class:`Follower`);
* :mod:`~mstm.alert.stdin`: ``--stdin`` (:func:`read_stdin`);
* :mod:`~mstm.alert.onfailure`: ``mstm-alert UNIT`` (:func:`failure_context`).
"""

from mstm.alert.batch import MAX_GROUPS, Batch, dedup_key
from mstm.alert.compose import Templates, alert_context, compose
from mstm.alert.events import Alert, from_entry, from_line, is_mstm, threshold_priority
from mstm.alert.follow import Follower, JournalSource
from mstm.alert.onfailure import UnitState, failure_context
from mstm.alert.postman import CursorStore, Postman, deliver_with_retries, state_dir
from mstm.alert.stdin import read_stdin

__all__ = [
    "MAX_GROUPS",
    "Alert",
    "Batch",
    "CursorStore",
    "Follower",
    "JournalSource",
    "Postman",
    "Templates",
    "UnitState",
    "alert_context",
    "compose",
    "dedup_key",
    "deliver_with_retries",
    "failure_context",
    "from_entry",
    "from_line",
    "is_mstm",
    "read_stdin",
    "state_dir",
    "threshold_priority",
]
