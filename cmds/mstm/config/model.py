"""What a loaded configuration is: the frozen dataclasses the commands receive.

:class:`GlobalConfig` holds the global file's sections (``GLOBAL_SECTIONS`` of the
schema); :class:`StreamConfig` one stream: the global file merged with the stream's
own, with one nested dataclass for each of its other sections.  A field holds the value
of the key of the same name in the dataclass's section; a comment names the key when it
is in another section or has another name.  mstm.config.build fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskSpaceConfig:
    """[disk_space_monitor]: the levels of free space mstm-diskwatch acts on."""

    base_priority: int
    level_good: str
    level_low: str
    level_vlow: str
    poll_interval: float
    hysteresis: str = "50"


@dataclass(frozen=True)
class EmailConfig:
    """[email], and [logging] email_timer: where and how mstm-alert mails alerts."""

    sender: str  # [email] from
    recipient: tuple[str, ...]
    subject: str
    smarthost: str
    port: int
    threshold: str
    starttls: bool
    ssl: bool
    username: str | None
    password_file: Path | None
    email_timer: float  # [logging] email_timer
    password_credential: str = "smtp-password"
    ca_file: Path | None = None
    timeout: float = 30.0
    template_dir: Path | None = None
    state_dir: Path | None = None


@dataclass(frozen=True)
class GlobalConfig:
    """The global file: [global], [disk_space_monitor], [email] and [logging]."""

    path: Path
    config_dir: Path
    data_stream_list: tuple[str, ...]
    general_poll_interval: float
    spool_base_dir: Path
    runtime_dir: Path
    log_level: str  # [logging] log_level
    disk_space_monitor: DiskSpaceConfig
    email: EmailConfig
    metrics_dir: Path | None = None  # [global] metrics_dir; None: no metrics files


@dataclass(frozen=True)
class OutgoingConfig:
    """[outgoing]: where a stream sends to, and how."""

    target_host: str
    target_port: int | None  # None: not written; ssh's own configuration decides
    target_dir: str
    transfer_protocol: str
    transfer_mode: str  # "move" | "mirror"
    target_uses_arrival_monitor: bool
    target_incoming_dir: str
    retry_count: int
    retry_backoff: float
    retry_backoff_max: float
    batch_max_items: int
    batch_max_bytes: int
    connect_timeout: float
    stall_seconds: float
    lease_seconds: float
    stop_file: str
    stop_file_poll_interval: float
    bwlimit: int  # KiB/s, 0 = none
    receipt_file_poll_count: int
    receipt_file_poll_interval: float
    control_file_extension: str
    receipt_file_extension: str
    thankyou_file_extension: str


@dataclass(frozen=True)
class RsyncSshConfig:
    """[rsync_ssh]: the programs and the ssh identity of rsync_ssh."""

    cmd: str
    ssh_cmd: str
    username: str | None
    identity_file: Path | None
    known_hosts: Path | None
    ssh_config: Path | None = None  # ssh -F


@dataclass(frozen=True)
class RsyncNativeConfig:
    """[rsync_native]: the rsync daemon's module and login."""

    cmd: str = "rsync"
    module: str | None = None
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class SftpConfig:
    """[sftp]: the login and the checks of sftp."""

    username: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    ssh_config: Path | None = None  # read for target_host's HostName, Port and User
    remote_checksum: bool = True
    verify_readback: bool = True


@dataclass(frozen=True)
class FtpConfig:
    """[ftp]: the login, TLS and checks of ftp and ftps."""

    username: str = "anonymous"
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    passive: bool = True
    verify_readback: bool = True


@dataclass(frozen=True)
class IncomingConfig:
    """[incoming]: the receiving side of a stream (mstm-receive)."""

    require_arrival_monitor: bool
    control_file_extension: str
    thankyou_file_extension: str
    stop_file: str
    incoming_dir: Path | None = None  # None only when built by hand: <directory>/.mstm-incoming
    receipt_file_extension: str = "mstm-rcpt"
    overwrite: bool = False
    max_control_bytes: int = 8 << 20
    abandoned_batch_seconds: float = 86400.0


@dataclass(frozen=True)
class PullConfig:
    """[pull]: what a pull stream fetches from [outgoing] target_host, and where to."""

    source_dir: str = ""
    item_pattern: str = "^[^.]"
    max_age_days: int = 0  # 0: no limit
    max_tasks: int = 1
    ledger: Path | None = None  # None only when built by hand: <spool_dir>/ledger.jsonl
    map: tuple[tuple[str, str], ...] = ()  # (regex, destination), first match wins


@dataclass(frozen=True)
class StreamConfig:
    """One stream: [data_stream] and the stream's other sections."""

    name: str
    global_file: Path
    stream_file: Path
    directory: Path
    transfer_unit: str  # "file" | "dir"
    status: str  # RUNNING | STOPPED | COMPLETE
    priority: int
    deletion_enabled: bool
    spool_dir: Path
    settle_seconds: float
    ignore_patterns: tuple[str, ...]
    ready_marker: str | None
    follow_symlinks: bool
    poll_interval: float
    log_level: str  # [logging] log_level
    outgoing: OutgoingConfig
    rsync_ssh: RsyncSshConfig
    incoming: IncomingConfig
    runtime_dir: Path  # [global] runtime_dir: ssh control sockets and other runtime files
    rsync_native: RsyncNativeConfig = RsyncNativeConfig()
    sftp: SftpConfig = SftpConfig()
    ftp: FtpConfig = FtpConfig()
    delete_undelivered: bool = False  # [data_stream]; only with deletion_enabled
    direction: str = "push"  # [data_stream] direction: "push" | "pull"
    pull: PullConfig = PullConfig()
    metrics_dir: Path | None = None  # [global] metrics_dir; None: no metrics files
    done_retention: float = 30 * 86400.0  # [data_stream]; 0: done/ records kept forever
    stuck_after: float = 3600.0  # [data_stream]

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"
