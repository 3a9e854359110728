"""Building the dataclasses from the merged view, with the checks that span keys.

Each ``_build_*`` reads one section through the :class:`View` and checks what no single
key's kind can: values that must agree (levels in order, distinct extensions, starttls
or ssl), keys required only in some cases (target_host, module, source_dir), and what
the values name on this host (the stream directory, the spool directory, key and
password files).  Each problem is a ConfigError naming the key to change.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

from mstm.config.files import read_regular_file
from mstm.config.kinds import CONTROL, AbsPath, Invalid, level_value
from mstm.config.model import (
    DiskSpaceConfig,
    EmailConfig,
    FtpConfig,
    GlobalConfig,
    IncomingConfig,
    OutgoingConfig,
    PullConfig,
    RsyncNativeConfig,
    RsyncSshConfig,
    SftpConfig,
    StreamConfig,
)
from mstm.config.view import View
from mstm.errors import ConfigError

# [outgoing] target_port when none is written, by transfer_protocol.  None: no port is
# given, so ssh's own configuration decides (a Port in target_host's Host entry, else
# 22), as MiStaMover's `rsync -e ssh` did; sftp reads the same entry (mstm.transports.sftp).
DEFAULT_PORTS: dict[str, int | None] = {"rsync_ssh": None, "sftp": None,
                                        "rsync_native": 873, "ftp": 21, "ftps": 21,
                                        "local": None}
MAX_SECRET_BYTES = 4096  # a password file


def build_global(v: View, path: Path) -> GlobalConfig:
    """The global file *path*, read through *v*, as a GlobalConfig."""
    return GlobalConfig(
        path=path,
        config_dir=v.get("global", "config_dir", Path),
        data_stream_list=v.get("global", "data_stream_list", tuple),
        general_poll_interval=v.get("global", "general_poll_interval", float),
        spool_base_dir=v.get("global", "spool_base_dir", Path),
        runtime_dir=v.get("global", "runtime_dir", Path),
        log_level=v.get("logging", "log_level", str),
        disk_space_monitor=_build_disk_space(v),
        email=_build_email(v),
        metrics_dir=_metrics_dir(v),
    )


def _metrics_dir(v: View) -> Path | None:
    """[global] metrics_dir: an absolute path, or None when empty (no metrics files)."""
    text = v.get("global", "metrics_dir", str).strip()
    if not text:
        return None
    try:
        return AbsPath().parse(text)
    except Invalid as err:
        raise v.error("global", "metrics_dir", f"{err} (or empty: no metrics files)") from None


def _build_disk_space(v: View) -> DiskSpaceConfig:
    s = "disk_space_monitor"
    good, low, vlow = (v.get(s, k, str) for k in ("level_good", "level_low", "level_vlow"))
    for (lower_key, lower), (upper_key, upper) in ((("level_low", low), ("level_good", good)),
                                                   (("level_vlow", vlow), ("level_low", low))):
        (lo, lo_pct), (hi, hi_pct) = level_value(lower), level_value(upper)
        if lo_pct == hi_pct and lo >= hi:
            # blame the one written in a file (the other may be a default)
            key = lower_key if (s, lower_key) in v.entries else upper_key
            raise v.error(s, key, f"{lower_key} ({lower}) must be below {upper_key} ({upper})")
    return DiskSpaceConfig(
        base_priority=v.get(s, "base_priority", int),
        level_good=good,
        level_low=low,
        level_vlow=vlow,
        poll_interval=v.get(s, "poll_interval", float),
        hysteresis=v.get(s, "hysteresis", str),
    )


def _build_email(v: View) -> EmailConfig:
    s = "email"
    if v.get(s, "starttls", bool) and v.get(s, "ssl", bool):
        raise v.error(s, "ssl", "starttls and ssl cannot both be on; choose one")
    username = v.opt(s, "username", str)
    return EmailConfig(
        sender=v.get(s, "from", str),
        recipient=v.get(s, "recipient", tuple),
        subject=v.get(s, "subject", str),
        smarthost=v.get(s, "smarthost", str),
        port=v.get(s, "port", int),
        threshold=v.get(s, "threshold", str),
        starttls=v.get(s, "starttls", bool),
        ssl=v.get(s, "ssl", bool),
        username=username or None,
        password_file=_secret_file(v, s, "password_file", mailer=True),
        email_timer=v.get("logging", "email_timer", float),
        password_credential=v.get(s, "password_credential", str),
        ca_file=v.opt(s, "ca_file", Path),
        timeout=v.get(s, "timeout", float),
        template_dir=v.opt(s, "template_dir", Path),
        state_dir=v.opt(s, "state_dir", Path),
    )


def build_stream(v: View, name: str, global_file: Path, stream_file: Path,
                 role: str = "send") -> StreamConfig:
    """Stream *name*, read through *v*, as a StreamConfig.

    For *role* "receive" (mstm-receive) [outgoing] may be incomplete, and neither the
    spool directory nor a local target is checked against the stream's directory.
    """
    s = "data_stream"
    if v.get(s, "name", str) != name:
        raise v.error(s, "name", f"{v.get(s, 'name', str)!r} differs from the stream's name"
                      f" {name!r} in data_stream_list")
    directory = _check_directory(v, v.get(s, "directory", Path))
    if role == "send" and v.get(s, "direction", str) == "push":
        _check_no_overlap(v, directory)
    return StreamConfig(
        name=name,
        global_file=global_file,
        stream_file=stream_file,
        directory=directory,
        transfer_unit=v.get(s, "transfer_unit", str),
        status=v.get(s, "status", str),
        priority=v.get(s, "priority", int),
        deletion_enabled=v.get(s, "deletion_enabled", bool),
        delete_undelivered=v.get(s, "delete_undelivered", bool),
        spool_dir=_check_spool_dir(v, directory) if role == "send"
        else v.get(s, "spool_dir", Path),
        settle_seconds=v.get(s, "settle_seconds", float),
        done_retention=v.get(s, "done_retention", float),
        stuck_after=v.get(s, "stuck_after", float),
        ignore_patterns=v.get(s, "ignore_patterns", tuple),
        ready_marker=v.opt(s, "ready_marker", str),
        follow_symlinks=v.get(s, "follow_symlinks", bool),
        poll_interval=v.get(s, "poll_interval", float),
        log_level=v.get("logging", "log_level", str),
        outgoing=_pull_outgoing(v) if v.get(s, "direction", str) == "pull"
        else _build_outgoing(v) if role == "send" else _receive_outgoing(v),
        rsync_ssh=_build_rsync_ssh(v),
        incoming=_build_incoming(v),
        runtime_dir=v.get("global", "runtime_dir", Path),
        metrics_dir=_metrics_dir(v),
        rsync_native=_build_rsync_native(v),
        sftp=_build_sftp(v),
        ftp=_build_ftp(v),
        direction=v.get(s, "direction", str),
        pull=_build_pull(v),
    )


def _check_no_overlap(v: View, directory: Path) -> None:
    """A local target may not lie inside the stream directory, nor contain it: a
    published file would be the stream's own source (the next scan sends it again, and a
    rename into place could replace a source that was never sent)."""
    if v.opt("outgoing", "transfer_protocol", str) != "local":
        return
    target = v.opt("outgoing", "target_dir", str)
    if not target:
        return
    real_dir = os.path.realpath(directory)
    real_target = os.path.realpath(target)
    inside = os.path.commonpath([real_dir, real_target])
    if inside in (real_dir, real_target):
        raise v.error("outgoing", "target_dir",
                      f"{target} and the stream directory {directory} lie one inside the "
                      f"other; a local target must be elsewhere")


def _check_directory(v: View, directory: Path) -> Path:
    try:
        st = os.stat(directory)
    except OSError as err:
        raise v.error("data_stream", "directory", f"{directory}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise v.error("data_stream", "directory", f"{directory}: not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise v.error("data_stream", "directory",
                      f"{directory}: not readable and searchable by uid {os.geteuid()}")
    return directory


def _check_spool_dir(v: View, directory: Path) -> Path:
    spool = v.get("data_stream", "spool_dir", Path)
    real_spool, real_dir = Path(os.path.realpath(spool)), Path(os.path.realpath(directory))
    if real_spool.is_relative_to(real_dir):
        raise v.error("data_stream", "spool_dir",
                      f"{spool} is inside the stream's directory {directory}; put it elsewhere")
    if not os.path.isdir(spool.parent):
        raise v.error("data_stream", "spool_dir",
                      f"its parent directory {spool.parent} does not exist")
    return spool


def _build_outgoing(v: View) -> OutgoingConfig:
    s = "outgoing"
    protocol = v.get(s, "transfer_protocol", str)
    host = v.opt(s, "target_host", str)
    if host is None and protocol != "local":
        raise v.error(s, "target_host", "is required (the host to send to)")
    backoff, backoff_max = v.get(s, "retry_backoff", float), v.get(s, "retry_backoff_max", float)
    if backoff_max < backoff:
        raise v.error(s, "retry_backoff_max",
                      f"{backoff_max:g} s is less than retry_backoff ({backoff:g} s)")
    return OutgoingConfig(
        target_host=host or "",
        target_port=v.opt(s, "target_port", int) or DEFAULT_PORTS[protocol],
        target_dir=v.get(s, "target_dir", str),
        transfer_protocol=protocol,
        transfer_mode=_transfer_mode(v),
        target_uses_arrival_monitor=v.get(s, "target_uses_arrival_monitor", bool),
        target_incoming_dir=v.get(s, "target_incoming_dir", str),
        retry_count=v.get(s, "retry_count", int),
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
        batch_max_items=v.get(s, "batch_max_items", int),
        batch_max_bytes=v.get(s, "batch_max_bytes", int),
        connect_timeout=v.get(s, "connect_timeout", float),
        stall_seconds=v.get(s, "stall_seconds", float),
        lease_seconds=v.get(s, "lease_seconds", float),
        stop_file=v.get(s, "stop_file", str),
        stop_file_poll_interval=v.get(s, "stop_file_poll_interval", float),
        bwlimit=v.get(s, "bwlimit", int),
        receipt_file_poll_count=v.get(s, "receipt_file_poll_count", int),
        receipt_file_poll_interval=v.get(s, "receipt_file_poll_interval", float),
        control_file_extension=v.get(s, "control_file_extension", str),
        receipt_file_extension=v.get(s, "receipt_file_extension", str),
        thankyou_file_extension=v.get(s, "thankyou_file_extension", str),
    )


def _receive_outgoing(v: View) -> OutgoingConfig:
    """[outgoing] of a stream loaded by mstm-receive: complete, or with empty targets."""
    try:
        return _build_outgoing(v)
    except ConfigError:
        pass  # a receive-only stream need not say where it would send to

    def value(key: str) -> object:
        try:
            return v.value("outgoing", key)
        except ConfigError:  # required, or refers to a key that is not set
            return None

    kw = {key: value(key) for key in OutgoingConfig.__dataclass_fields__}
    for key in ("target_host", "target_dir", "transfer_mode", "target_incoming_dir"):
        kw[key] = kw[key] or ""
    kw["target_port"] = kw["target_port"] or None
    return OutgoingConfig(**kw)  # type: ignore[arg-type]


def _transfer_mode(v: View) -> str:
    """[outgoing] transfer_mode, else MiStaMover's [rsync_ssh] one; never a silent default."""
    mode = v.opt("outgoing", "transfer_mode", str) or v.opt("rsync_ssh", "transfer_mode", str)
    if mode is None:
        raise v.error("outgoing", "transfer_mode",
                      "is required: set move or mirror (MiStaMover defaulted to move, which"
                      " deletes the source; mstm makes you choose)")
    return mode


def _build_rsync_ssh(v: View) -> RsyncSshConfig:
    s = "rsync_ssh"
    identity = _readable_file(v, s, "identity_file")
    known_hosts = _existing_file(v, s, "known_hosts")
    return RsyncSshConfig(
        cmd=v.get(s, "cmd", str),
        ssh_cmd=v.get(s, "ssh_cmd", str),
        username=v.opt(s, "username", str),
        identity_file=identity,
        known_hosts=known_hosts,
        ssh_config=_readable_file(v, s, "ssh_config"),
    )


def _readable_file(v: View, section: str, key: str) -> Path | None:
    """The path written for [*section*] *key* (None if unset): a file this user may read."""
    path = v.opt(section, key, Path)
    if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise v.error(section, key, f"{path}: not a readable file")
    return path


def _existing_file(v: View, section: str, key: str) -> Path | None:
    """The path written for [*section*] *key* (None if unset): it must exist."""
    path = v.opt(section, key, Path)
    if path is not None and not os.path.exists(path):
        raise v.error(section, key, f"{path}: no such file")
    return path


def _secret_file(v: View, section: str, key: str, *, mailer: bool = False) -> Path | None:
    """A password file: a regular file of one line of text, at most MAX_SECRET_BYTES.

    Its content never appears in a message.  One trailing newline is allowed (the
    readers drop it).  For [email] (*mailer*) a file that is missing, that this user may
    not read, or that is empty is left to mstm-alert, which says so (exit 78) when it
    needs the password: the other commands load [email] too but never read it, and
    mstm-alert may get the password from its systemd credential instead.
    """
    path = v.opt(section, key, Path)
    if path is None or (mailer and not (os.path.exists(path) and os.access(path, os.R_OK))):
        return path
    where = {"file": str(v.file_of(section, key)), "section": section, "key": key}
    label = f"{path}: "
    data = read_regular_file(path, MAX_SECRET_BYTES, label, **where)
    unshown = " (its content is not shown)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{label}not UTF-8 text{unshown}", **where) from None
    secret = text[:-1] if text.endswith("\n") else text
    if "\n" in secret:
        raise ConfigError(f"{label}holds more than one line; write the password alone on one"
                          f" line{unshown}", **where)
    if CONTROL.search(secret):
        raise ConfigError(f"{label}holds a control character (a NUL byte, a carriage return,"
                          f" ...){unshown}", **where)
    if not secret and not mailer:
        raise ConfigError(f"{label}is empty (leave {key} unset for no password)", **where)
    return path


def _build_rsync_native(v: View) -> RsyncNativeConfig:
    s = "rsync_native"
    module = v.opt(s, "module", str)
    if module is None and v.get("outgoing", "transfer_protocol", str) == "rsync_native":
        raise v.error(s, "module", "is required with transfer_protocol rsync_native")
    return RsyncNativeConfig(cmd=v.get(s, "cmd", str), module=module,
                             username=v.opt(s, "username", str),
                             password_file=_secret_file(v, s, "password_file"))


def _build_sftp(v: View) -> SftpConfig:
    s = "sftp"
    known_hosts = _existing_file(v, s, "known_hosts")
    return SftpConfig(username=v.opt(s, "username", str),
                      identity_file=_readable_file(v, s, "identity_file"),
                      known_hosts=known_hosts,
                      ssh_config=_readable_file(v, s, "ssh_config"),
                      remote_checksum=v.get(s, "remote_checksum", bool),
                      verify_readback=v.get(s, "verify_readback", bool))


def _build_ftp(v: View) -> FtpConfig:
    s = "ftp"
    return FtpConfig(username=v.get(s, "username", str),
                     password_file=_secret_file(v, s, "password_file"),
                     tls=v.get(s, "tls", bool) or
                     v.get("outgoing", "transfer_protocol", str) == "ftps",
                     ca_file=_readable_file(v, s, "ca_file"),
                     passive=v.get(s, "passive", bool),
                     verify_readback=v.get(s, "verify_readback", bool))


def _build_incoming(v: View) -> IncomingConfig:
    s = "incoming"
    exts = {k: v.get(s, k, str) for k in ("control_file_extension", "receipt_file_extension",
                                          "thankyou_file_extension")}
    for key, ext in exts.items():  # each kind of handshake file must be told apart by name
        for other_key, other in exts.items():
            if key != other_key and (ext == other or ext.endswith("." + other)):
                raise v.error(s, key, f"{ext!r} cannot be told apart from {other_key}"
                              f" {other!r}; choose distinct extensions")
    return IncomingConfig(
        require_arrival_monitor=v.get(s, "require_arrival_monitor", bool),
        control_file_extension=exts["control_file_extension"],
        thankyou_file_extension=exts["thankyou_file_extension"],
        stop_file=v.get(s, "stop_file", str),
        incoming_dir=v.get(s, "incoming_dir", Path),
        receipt_file_extension=exts["receipt_file_extension"],
        overwrite=v.get(s, "overwrite", bool),
        max_control_bytes=v.get(s, "max_control_bytes", int),
        abandoned_batch_seconds=v.get(s, "abandoned_batch_seconds", float),
    )


def _pull_outgoing(v: View) -> OutgoingConfig:
    """[outgoing] of a pull stream: target_host is the host pulled from; no target_dir."""
    s = "outgoing"
    out = _receive_outgoing(v)
    if not out.target_host:
        raise v.error(s, "target_host", "is required (the host to pull from)")
    mode = (v.opt(s, "transfer_mode", str) or v.opt("rsync_ssh", "transfer_mode", str)
            or "mirror")
    if mode == "move":
        raise v.error(s, "transfer_mode", "move is not implemented for pull streams yet; use"
                      " mirror (the remote items are never deleted)")
    if out.transfer_protocol != "rsync_ssh":
        raise v.error(s, "transfer_protocol", "pull streams work over rsync_ssh only")
    return replace(out, transfer_mode=mode,
                   target_port=out.target_port or DEFAULT_PORTS[out.transfer_protocol])


def _build_pull(v: View) -> PullConfig:
    s = "pull"
    source_dir = v.opt(s, "source_dir", str)
    if source_dir is None and v.get("data_stream", "direction", str) == "pull":
        raise v.error(s, "source_dir", "is required for a pull stream (the remote directory"
                      " whose entries are fetched)")
    return PullConfig(
        source_dir=source_dir or "",
        item_pattern=v.get(s, "item_pattern", str),
        max_age_days=v.get(s, "max_age_days", int),
        max_tasks=v.get(s, "max_tasks", int),
        ledger=v.get(s, "ledger", Path),
        map=v.get(s, "map", tuple),
    )
