"""Sending mail through the configured SMTP server, and the outbox that keeps what could
not be sent yet.

The password is read from the systemd credential ``[email] password_credential`` in
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``), else from ``[email] password_file``.
It is held only in memory, passed only to ``smtplib``'s ``login()``, and never appears on
a command line, in a log line or in an exception message of ours.

The outbox (``<state_dir>/outbox/``) holds one JSON file per message and recipient,
written to a temporary name, fsync'd and renamed into place, so a message either is
there whole or not at all.  A message leaves it only once the SMTP server has accepted
it; a server that is down means "try again later", not "lost".  A message the server
refuses for good (5xx: unknown recipient, rejected content) is moved to
``<state_dir>/rejected/`` with the reason, and said loudly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

from mstm.config import EmailConfig
from mstm.errors import ConfigError

log = logging.getLogger("mstm.mailer")

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class MailError(Exception):
    """Sending failed; ``permanent`` when trying again cannot help (a 5xx answer)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def read_password(email: EmailConfig) -> str | None:
    """The SMTP password: the systemd credential, else password_file; None if neither."""
    candidates: list[tuple[Path, str, str]] = []
    creds = os.environ.get(CREDENTIALS_ENV)
    if creds:
        candidates.append((Path(creds) / email.password_credential, "password_credential",
                           f"systemd credential {email.password_credential!r}"))
    if email.password_file is not None:
        candidates.append((email.password_file, "password_file", str(email.password_file)))
    for path, key, what in candidates:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if key == "password_credential":
                continue  # LoadCredential= not set for this unit: fall back
            raise ConfigError(f"{path}: no such file", section="email", key=key) from None
        except OSError as e:
            raise ConfigError(f"cannot read {what}: {e.strerror}", section="email",
                              key=key) from None
        try:
            password = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"{what} is not UTF-8 text", section="email", key=key) from None
        if not password:
            raise ConfigError(f"{what} is empty", section="email", key=key)
        return password
    return None


@dataclass
class Mailer:
    """One SMTP server, as [email] describes it."""

    email: EmailConfig
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, email: EmailConfig) -> Mailer:
        password = read_password(email) if email.username else None
        if email.username and password is None:
            raise ConfigError("username is set but there is no password: set password_file"
                              " or load the systemd credential"
                              f" {email.password_credential!r}", section="email",
                              key="username")
        return cls(email, password)

    def __repr__(self) -> str:  # never the password, whatever prints us
        return f"Mailer({self.email.smarthost}:{self.email.port})"

    def _tls(self) -> ssl.SSLContext:
        ca = str(self.email.ca_file) if self.email.ca_file else None
        return ssl.create_default_context(cafile=ca)

    def _connect(self) -> smtplib.SMTP:
        e = self.email
        if e.ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(e.smarthost, e.port, timeout=e.timeout,
                                                  context=self._tls())
        else:
            smtp = smtplib.SMTP(e.smarthost, e.port, timeout=e.timeout)
        try:
            smtp.ehlo_or_helo_if_needed()
            if e.starttls:
                smtp.starttls(context=self._tls())
                smtp.ehlo()
            if e.username and self.password is not None:
                _login(smtp, e.username, self.password)
        except BaseException:
            with contextlib.suppress(Exception):
                smtp.close()
            raise
        return smtp

    def check(self) -> None:
        """Connect, say hello, negotiate TLS and log in, then quit (mstm-alert --check)."""
        try:
            smtp = self._connect()
        except (OSError, smtplib.SMTPException, ssl.SSLError) as e:
            raise MailError(_describe(e)) from None
        with contextlib.suppress(Exception):
            smtp.quit()

    def send(self, messages: list[tuple[str, str, bytes]]) -> list[MailError | None]:
        """Send (sender, recipient, raw message) triples over one connection.

        One result per message: None when accepted.  A connection that fails raises
        MailError (temporary unless the server said 5xx at login)."""
        try:
            smtp = self._connect()
        except smtplib.SMTPAuthenticationError as e:
            raise MailError(f"login refused: {_describe(e)}") from None
        except (OSError, smtplib.SMTPException, ssl.SSLError) as e:
            raise MailError(_describe(e)) from None
        results: list[MailError | None] = []
        try:
            for sender, recipient, raw in messages:
                try:
                    smtp.sendmail(sender, [recipient], raw)
                    results.append(None)
                except smtplib.SMTPRecipientsRefused as e:
                    code = min((c for c, _ in e.recipients.values()), default=0)
                    results.append(MailError(f"recipient refused: {_describe(e)}",
                                             permanent=code >= 500))
                except smtplib.SMTPResponseException as e:
                    results.append(MailError(_describe(e), permanent=e.smtp_code >= 500))
                except (OSError, smtplib.SMTPException) as e:
                    results.append(MailError(_describe(e)))
                    break  # the connection is gone: the rest waits too
        finally:
            with contextlib.suppress(Exception):
                smtp.quit()
        results += [MailError("not tried: the connection failed")] * (len(messages) - len(results))
        return results


def _login(smtp: smtplib.SMTP, username: str, password: str) -> None:
    """AUTH with one mechanism (PLAIN, else LOGIN, else CRAM-MD5): a refused password is
    not offered again and again (smtplib's login() tries every mechanism in turn)."""
    if not smtp.has_extn("auth"):
        raise smtplib.SMTPNotSupportedError("the server offers no AUTH (is TLS needed?)")
    offered = smtp.esmtp_features["auth"].upper().split()
    methods = (("PLAIN", smtp.auth_plain), ("LOGIN", smtp.auth_login),
               ("CRAM-MD5", smtp.auth_cram_md5))
    for name, method in methods:
        if name in offered:
            smtp.user, smtp.password = username, password
            smtp.auth(name, method)
            return
    raise smtplib.SMTPNotSupportedError(f"no AUTH mechanism in common (offered: {offered})")


def _describe(e: BaseException) -> str:
    if isinstance(e, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{r}: {c} {m.decode('utf-8', 'replace')}"
                         for r, (c, m) in e.recipients.items())
    if isinstance(e, smtplib.SMTPResponseException):
        msg = e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) \
            else str(e.smtp_error)
        return f"{e.smtp_code} {msg}"
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- the outbox


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write *data* to *path*: temporary file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Delivery:
    sent: int
    left: int
    rejected: int
    error: str | None  # the temporary error that stopped delivery, if any


class Outbox:
    """Messages waiting to be sent: one file each, oldest first."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "outbox"
        self.rejected_dir = state_dir / "rejected"

    def put(self, sender: str, recipient: str, message: EmailMessage) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        raw = message.as_bytes(policy=SMTP_POLICY)
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
        data = {"from": sender, "to": recipient, "message": raw.decode("utf-8", "surrogateescape"),
                "created": time.time()}
        path = self.dir / name
        write_atomic(path, (json.dumps(data) + "\n").encode("utf-8", "surrogateescape"))
        return path

    def pending(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir()
                          if p.suffix == ".json" and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def deliver(self, mailer: Mailer) -> Delivery:
        """Send what waits, oldest first, over one connection."""
        paths = self.pending()
        if not paths:
            return Delivery(0, 0, 0, None)
        batch: list[tuple[Path, tuple[str, str, bytes]]] = []
        for p in paths:
            try:
                d = json.loads(p.read_text("utf-8", "surrogateescape"))
                batch.append((p, (d["from"], d["to"],
                                  d["message"].encode("utf-8", "surrogateescape"))))
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._reject(p, f"unreadable: {e}")
        try:
            results = mailer.send([m for _, m in batch])
        except MailError as e:
            return Delivery(0, len(batch), 0, str(e))
        sent = rejected = 0
        error = None
        for (p, (_, to, _raw)), result in zip(batch, results, strict=True):
            if result is None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                sent += 1
            elif result.permanent:
                self._reject(p, str(result))
                log.error("mail to %s refused for good, kept in %s: %s", to,
                          self.rejected_dir, result)
                rejected += 1
            else:
                error = error or str(result)
        return Delivery(sent, len(batch) - sent - rejected, rejected, error)

    def _reject(self, path: Path, reason: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        with contextlib.suppress(OSError):
            os.replace(path, self.rejected_dir / path.name)
            (self.rejected_dir / f"{path.name}.reason").write_text(reason + "\n")
