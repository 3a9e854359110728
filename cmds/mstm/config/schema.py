"""The schema: every key of every section, with its kind, its default and its meaning.

``SCHEMA`` is the single source of every key.  It drives parsing and validation, the
"did you mean" hints and mstm.conf(5) (man/gen_conf_page.py); conf/global.ini documents
it.  This module is long because the table is: one entry a key, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from mstm.config.kinds import (
    AbsPath,
    Bool,
    Choice,
    FileName,
    Int,
    Kind,
    Level,
    Marker,
    Number,
    PullMap,
    Regex,
    RemoteDir,
    Seconds,
    Size,
    StreamNames,
    Text,
    Word,
    Words,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
Ref = tuple[str, str]  # (section, key)


@dataclass(frozen=True)
class Key:
    """One key: its type, its default (text, may hold $(section:key)) and its meaning."""

    kind: Kind
    default: str | None
    doc: str
    required: bool = False
    ignored: bool = False  # accepted for MiStaMover compatibility, then ignored
    refused: str | None = None  # never accepted; the reason says what to do instead


def _compat(doc: str = "ignored (MiStaMover compatibility)") -> Key:
    return Key(Text(), None, doc, ignored=True)


_LOG_LEVEL = Choice(LOG_LEVELS)
_NO_PASSWORD = Key(Text(), None, "refused: use password_file or a systemd credential",
                   refused="passwords are not accepted in configuration files (they get"
                   " logged and copied); use password_file or a systemd credential")

SCHEMA: dict[str, dict[str, Key]] = {
    "global": {
        "data_stream_list": Key(StreamNames(), None, "the names of the streams; may be empty",
                                required=True),
        "config_dir": Key(AbsPath(), None,
                          "where the stream files are (default: the global file's directory)"),
        "general_poll_interval": Key(Seconds(positive=True), "3",
                                     "default poll interval of every stream"),
        "spool_base_dir": Key(AbsPath(), "/var/spool/mstm",
                              "parent of the default spool directory of each stream"),
        "runtime_dir": Key(AbsPath(), None,
                           "runtime state, such as ssh's control sockets (default:"
                           " $RUNTIME_DIRECTORY, else /run/mstm); one longer than 70 bytes"
                           " cannot hold a socket, whose name is limited to 107 bytes with"
                           " the 17 ssh adds: a private directory under $TMPDIR or /tmp"
                           " is used for them then"),
        "metrics_dir": Key(Text(), "/var/lib/mstm/metrics",
                           "where long-running commands write their Prometheus text files"
                           " (mode 0644) for node_exporter's textfile collector (empty:"
                           " none; $MSTM_METRICS_DIR, if set, replaces the default).  Not"
                           " Debian's /var/lib/prometheus/node-exporter: root's collectors"
                           " write there with sponge, which follows symbolic links, so a"
                           " service user able to write it could make root overwrite any"
                           " file.  Point node_exporter here with"
                           " ARGS=\"--collector.textfile.directory=/var/lib/mstm/metrics\" in"
                           " /etc/default/prometheus-node-exporter (Debian's own collectors'"
                           " files are then no longer scraped), or keep Debian's directory"
                           " and link each file into it as root: ln -s"
                           " /var/lib/mstm/metrics/mstm_send_proj1.prom"
                           " /var/lib/prometheus/node-exporter/ (node_exporter reads"
                           " through the link)"),
        "base_incoming_dir": _compat(),
        "debug_on": _compat(),
    },
    "data_stream": {
        "name": Key(Word(), None,
                    "the stream's name; if set, must equal its name in data_stream_list"),
        "directory": Key(AbsPath(), None, "the directory to watch and send from",
                         required=True),
        "transfer_unit": Key(Choice(("file", "dir")), "file",
                             "what one item is: each file, or each top-level directory"),
        "status": Key(Choice(("RUNNING", "STOPPED", "COMPLETE")), "RUNNING",
                      "RUNNING sends; STOPPED and COMPLETE send nothing"),
        "priority": Key(Int(), "$(disk_space_monitor:base_priority)",
                        "disk-space priority (default: [disk_space_monitor] base_priority)"),
        "deletion_enabled": Key(Bool(), "false",
                                "the disk-space monitor may delete delivered items"),
        "delete_undelivered": Key(Bool(), "false",
                                  "with deletion_enabled: at VLOW also delete undelivered items"),
        "spool_dir": Key(AbsPath(), "$(global:spool_base_dir)/$(data_stream:name)",
                         "the stream's durable queue (default: <spool_base_dir>/<name>)"),
        "done_retention": Key(Seconds(), "30d",
                              "how long the spool keeps the record of a delivered item (done/);"
                              " older ones are pruned by the stream itself, once an hour; 0"
                              " keeps them forever.  In mirror mode a record is kept as long"
                              " as its source is there unchanged (it is what stops a second"
                              " sending)"),
        "stuck_after": Key(Seconds(positive=True), "1h",
                           "an item queued this long, or a target unreachable this long, is"
                           " stuck: one journal warning per item (MSTM_EVENT=stuck), the"
                           " cause in the unit's status line, and the metrics"),
        "settle_seconds": Key(Seconds(), "5", "an item must be unchanged this long to be ready"),
        "ignore_patterns": Key(Words(), "*.part *.tmp *.swp *~ #*#",
                               "globs of names never sent (dot-files are always ignored)"),
        "ready_marker": Key(Marker(), None,
                            "an item is ready only once this file exists (empty: no marker)"),
        "follow_symlinks": Key(Bool(), "false",
                               "a symbolic link to a regular file is an item, sent and "
                               "verified as that file (transfer_unit = file only); links to "
                               "directories, dangling links, loops and links to a file of "
                               "another owner (unless root owns the link) are skipped; move "
                               "mode deletes only the link"),
        "poll_interval": Key(Seconds(positive=True), "$(global:general_poll_interval)",
                             "how often to rescan (default: [global] general_poll_interval)"),
        "direction": Key(Choice(("push", "pull")), "push",
                         "push sends directory to the target; pull fetches items from it"),
    },
    "outgoing": {
        "target_host": Key(Word(), None,
                           "the host to send to (required unless transfer_protocol is local)"),
        "target_port": Key(Int(1, 65535), None,
                           "port of the target's server (default: for rsync_ssh and sftp,"
                           " the Port of target_host's Host entry in the ssh client"
                           " configuration, else 22, as plain ssh does; 873 for"
                           " rsync_native, 21 for ftp and ftps)"),
        "target_dir": Key(RemoteDir(), None, "the absolute directory on the target host",
                          required=True),
        "transfer_protocol": Key(
            Choice(("rsync_ssh", "rsync_native", "sftp", "ftp", "ftps", "local")),
            "rsync_ssh", "how items travel"),
        "transfer_mode": Key(Choice(("move", "mirror")), None,
                             "required: move (delete the source once verified) or mirror"),
        "target_uses_arrival_monitor": Key(Bool(), "false",
                                           "the target runs mstm-receive (handshake files)"),
        "target_incoming_dir": Key(RemoteDir(), "$(outgoing:target_dir)/.mstm-incoming",
                                   "with the arrival monitor: the receiver's incoming area"),
        "retry_count": Key(Int(0, 1_000_000), "3",
                           "attempts per item in all, the first one included, as MiStaMover"
                           " counted them: 3 is one try and two retries, then the item is"
                           " parked as failed (0 means the same as 1); a target that cannot"
                           " be reached costs no item an attempt; pull streams do not use"
                           " it: a failed fetch is tried again every cycle"),
        "retry_backoff": Key(Seconds(), "2", "first wait before a retry (doubles each time)"),
        "retry_backoff_max": Key(Seconds(), "600", "longest wait between retries"),
        "batch_max_items": Key(Int(1), "10000", "most items sent in one transfer"),
        "batch_max_bytes": Key(Size(), "64G", "most bytes sent in one transfer"),
        "connect_timeout": Key(Seconds(positive=True), "15", "ssh connection timeout"),
        "stall_seconds": Key(Seconds(positive=True), "120",
                             "a transfer with no progress this long is aborted"),
        "lease_seconds": Key(Seconds(10), "300",
                             "a claim whose owner is silent this long is taken over"),
        "stop_file": Key(FileName(), ".stop",
                         "a file of this name in directory pauses the stream"),
        "stop_file_poll_interval": Key(Seconds(positive=True), "30",
                                       "how often a paused stream checks its stop file"),
        "bwlimit": Key(Int(0), "0", "bandwidth limit in KiB/s (0: none)"),
        "receipt_file_poll_count": Key(Int(1, 1_000_000), "100",
                                       "how many times to look for a receipt"),
        "receipt_file_poll_interval": Key(Seconds(positive=True), "5",
                                          "wait between looks for a receipt"),
        "control_file_extension": Key(FileName(), "mstm-ctrl", "extension of control files"),
        "receipt_file_extension": Key(FileName(), "mstm-rcpt", "extension of receipt files"),
        "thankyou_file_extension": Key(FileName(), "mstm-thanks",
                                       "extension of thank-you files"),
        "always_zip": Key(Bool(), "false",
                          "zip directory items (MiStaMover compatibility; not used yet)"),
        "dir_size_limit": Key(Number(), "1000",
                              "MB; zip directories above it (MiStaMover compat.; not used yet)"),
    },
    "incoming": {
        "require_arrival_monitor": Key(Bool(), "false",
                                       "only accept items that come with a control file"),
        "control_file_extension": Key(FileName(), "mstm-ctrl", "extension of control files"),
        "thankyou_file_extension": Key(FileName(), "mstm-thanks",
                                       "extension of thank-you files"),
        "stop_file": Key(FileName(), ".stop", "a file of this name pauses receiving"),
        "incoming_dir": Key(AbsPath(), "$(data_stream:directory)/.mstm-incoming",
                            "where senders put batches and handshake files for mstm-receive"
                            " (default: <directory>/.mstm-incoming)"),
        "receipt_file_extension": Key(FileName(), "mstm-rcpt", "extension of receipt files"),
        "overwrite": Key(Bool(), "false",
                         "replace a published file whose content differs (else: refused)"),
        "max_control_bytes": Key(Size(1 << 30), "8M",
                                 "larger control files are quarantined unread"),
        "abandoned_batch_seconds": Key(Seconds(), "86400",
                                       "a batch directory without a control file, receipt or"
                                       " thank-you, in which nothing changed for this long,"
                                       " is removed (a sender died mid-transfer; 0: never)"),
    },
    "rsync_ssh": {
        "cmd": Key(Word(), "rsync", "the rsync program"),
        "ssh_cmd": Key(Word(), "ssh", "the ssh program"),
        "username": Key(Word(), None, "user on the target host (empty: the current user)"),
        "identity_file": Key(AbsPath(), None, "ssh private key (must be a readable file)"),
        "known_hosts": Key(AbsPath(), None, "ssh known_hosts file to use (must exist)"),
        "ssh_config": Key(AbsPath(), None,
                          "ssh client configuration file, given to ssh as -F (must be a"
                          " readable file); its Host entry for target_host may set Port,"
                          " HostName, User and more (empty: ssh's own, ~/.ssh/config of"
                          " the user mstm runs as, then /etc/ssh/ssh_config)"),
        "transfer_mode": Key(Choice(("move", "mirror")), None,
                             "MiStaMover's place for transfer_mode; [outgoing] wins"),
        "use_checksum": _compat("ignored (MiStaMover compatibility): mstm compares every"
                                " file's sha256 at the target itself, whatever rsync does"),
        "check_size": _compat("ignored (MiStaMover compatibility): sizes and sha256 are"
                              " always verified"),
    },
    "rsync_native": {
        "cmd": Key(Word(), "rsync", "the rsync program"),
        "module": Key(Word(), None, "the rsync daemon's module (required for rsync_native)"),
        "username": Key(Word(), None, "user of the rsync daemon (empty: no login)"),
        "password_file": Key(AbsPath(), None, "file holding the daemon password (default:"
                             " the systemd credential rsync-password, if there is one)"),
        "password": _NO_PASSWORD,
    },
    "sftp": {
        "username": Key(Word(), None, "user on the target host (empty: the current user)"),
        "identity_file": Key(AbsPath(), None, "ssh private key (must be a readable file)"),
        "known_hosts": Key(AbsPath(), None,
                           "known_hosts file to check the host key against (must exist)"),
        "ssh_config": Key(AbsPath(), None,
                          "ssh client configuration file whose Host entry for target_host"
                          " gives HostName, Port and User where [outgoing] and [sftp] do"
                          " not (must be a readable file; empty: ~/.ssh/config of the"
                          " user mstm runs as, then /etc/ssh/ssh_config, if they exist)"),
        "remote_checksum": Key(Bool(), "true",
                               "ask the target's sha256sum over the same ssh connection"),
        "verify_readback": Key(Bool(), "true",
                               "without a remote checksum, read each file back to hash it"),
    },
    "ftp": {
        "username": Key(Word(), "anonymous", "FTP login"),
        "password_file": Key(AbsPath(), None, "file holding the FTP password (default:"
                             " the systemd credential ftp-password, if there is one)"),
        "tls": Key(Bool(), "false", "use TLS (AUTH TLS, PROT P); ftps always does"),
        "ca_file": Key(AbsPath(), None,
                       "CA certificates the server's certificate is checked against"
                       " (default: the system's)"),
        "passive": Key(Bool(), "true", "passive mode (the client opens data connections)"),
        "verify_readback": Key(Bool(), "true",
                               "read each file back after upload to hash it"),
        "password": _NO_PASSWORD,
    },
    "pull": {
        "source_dir": Key(RemoteDir(), None,
                          "pull: the remote directory whose entries are the items (required)"),
        "item_pattern": Key(Regex(), "^[^.]", "pull: only items whose name matches"),
        "max_age_days": Key(Int(0, 36500), "0",
                            "pull: skip items unchanged for longer than this (0: no limit)"),
        "max_tasks": Key(Int(1, 64), "1", "pull: items fetched at the same time"),
        "ledger": Key(AbsPath(), "$(data_stream:spool_dir)/ledger.jsonl",
                      "pull: the done-ledger (default: <spool_dir>/ledger.jsonl)"),
        "map": Key(PullMap(), "",
                   "pull: 'REGEX -> DESTINATION' lines, first match wins (empty: directory)"),
    },
    "disk_space_monitor": {
        "base_priority": Key(Int(), "100", "streams at or below it are stopped first"),
        "level_good": Key(Level(), "1500", "free space above it is GOOD (MB or N%)"),
        "level_low": Key(Level(), "1000", "free space below it is LOW (MB or N%)"),
        "level_vlow": Key(Level(), "500", "free space below it is VLOW (MB or N%)"),
        "poll_interval": Key(Seconds(positive=True), "60", "how often free space is checked"),
        "hysteresis": Key(Level(), "50",
                          "a level is left upwards only this far above it (MB or N%)"),
    },
    "email": {
        "from": Key(Text(empty_ok=False), None, "sender address (default: mstm@<host name>)"),
        "recipient": Key(Words(), "", "addresses alerts go to (empty: no mail)"),
        "subject": Key(Text(empty_ok=False), "mstm alert", "subject of alert mails"),
        "smarthost": Key(Word(), "localhost", "SMTP server"),
        "port": Key(Int(1, 65535), "25", "SMTP port"),
        "threshold": Key(_LOG_LEVEL, "ERROR", "least severe log level that is mailed"),
        "starttls": Key(Bool(), "false", "upgrade the SMTP connection with STARTTLS"),
        "ssl": Key(Bool(), "false", "connect to the SMTP server over TLS"),
        "username": Key(Word(), None, "SMTP login (empty: none)"),
        "password_file": Key(AbsPath(), None,
                             "file holding the SMTP password (or use a systemd credential)"),
        "password_credential": Key(FileName(), "smtp-password",
                                   "name of the systemd credential holding the SMTP password"),
        "ca_file": Key(AbsPath(), None,
                       "CA certificates for the SMTP server's certificate (default: system's)"),
        "timeout": Key(Seconds(positive=True), "30", "SMTP connection timeout"),
        "template_dir": Key(AbsPath(), None,
                            "directory of mail templates overriding the built-in ones"),
        "state_dir": Key(AbsPath(), None,
                         "mstm-alert's journal cursor and outbox (default: $STATE_DIRECTORY,"
                         " else /var/lib/mstm)"),
        "password": _NO_PASSWORD,
    },
    "logging": {
        "log_level": Key(_LOG_LEVEL, "INFO", "least severe level logged"),
        "email_timer": Key(Seconds(positive=True), "300",
                           "alerts are gathered this long and sent as one mail"),
        "base_log_dir": _compat(),
        "port": _compat(),
    },
}

# Sections whose values make up GlobalConfig; the others belong to streams.
GLOBAL_SECTIONS = ("global", "disk_space_monitor", "email", "logging")
