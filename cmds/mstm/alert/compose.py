"""Messages from the Jinja2 templates: the built-in ones, or the admin's in template_dir.

``alert.*`` render a :class:`~mstm.alert.batch.Batch` (:func:`alert_context`),
``failure.*`` the OnFailure mail (:func:`mstm.alert.onfailure.failure_context`); each
kind has a subject, a text and an HTML template, and :func:`compose` makes one message
of the three.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import jinja2

from mstm.alert.batch import Batch
from mstm.alert.events import threshold_priority
from mstm.config import EmailConfig

log = logging.getLogger("mstm.alert")


class Templates:
    """The built-in templates, each replaceable by a file of the same name in template_dir."""

    NAMES = ("alert.subject", "alert.txt", "alert.html",
             "failure.subject", "failure.txt", "failure.html")

    def __init__(self, template_dir: Path | None) -> None:
        options: dict[str, Any] = {"trim_blocks": True, "lstrip_blocks": True,
                                   "keep_trailing_newline": True,
                                   "autoescape": jinja2.select_autoescape(["html"])}
        self.builtin = jinja2.Environment(loader=jinja2.PackageLoader("mstm.alert", "templates"),
                                          undefined=jinja2.StrictUndefined, **options)
        self.admin = (jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)),
                                         **options) if template_dir else None)

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        if self.admin is not None:
            try:
                return self.admin.get_template(name).render(context)
            except jinja2.TemplateNotFound:
                pass
            except jinja2.TemplateError as e:
                log.error("template %s in template_dir is broken (%s); using the built-in one",
                          name, e)
        return self.builtin.get_template(name).render(context)


def compose(templates: Templates, kind: str, context: Mapping[str, Any], sender: str,
            recipient: str) -> EmailMessage:
    """One message, text and HTML, from the templates kind.subject/.txt/.html."""
    subject = " ".join(templates.render(f"{kind}.subject", context).split())
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("mstm-alert")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(templates.render(f"{kind}.txt", context))
    msg.add_alternative(templates.render(f"{kind}.html", context), subtype="html")
    return msg


def readable(msg: EmailMessage) -> str:
    """A message as a person reads it (--dry-run): headers, then each part decoded."""
    head = "".join(f"{k}: {v}\n" for k, v in msg.items()
                   if k in ("Subject", "From", "To", "Date"))
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            body = part.get_content()
            parts.append(f"--- {part.get_content_type()}\n{body}")
    return head + "".join(parts) + "\n"


def alert_context(batch: Batch, email: EmailConfig, config_path: Path) -> dict[str, Any]:
    groups = batch.ordered()
    times = [g.first.time for g in groups] + [g.last.time for g in groups]
    fmt = "%Y-%m-%d %H:%M:%S"
    return {
        "subject": email.subject,
        "host": socket.gethostname(),
        "total": batch.total,
        "groups": groups,
        "overflow": batch.overflow,
        "streams": sorted({g.first.stream for g in groups if g.first.stream}),
        "since": datetime.fromtimestamp(min(times)).strftime(fmt) if times else "",
        "until": datetime.fromtimestamp(max(times)).strftime(fmt) if times else "",
        "threshold": email.threshold,
        "threshold_priority": threshold_priority(email.threshold),
        "config": str(config_path),
    }
