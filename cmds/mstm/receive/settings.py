"""What a receiver is told (:class:`Settings`) and what it reports (:class:`Summary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mstm.config import StreamConfig
from mstm.protocol import Status


@dataclass(frozen=True)
class Settings:
    stream: str
    directory: Path  # D: where verified items are published
    incoming_dir: Path  # I: where senders put batches and handshake files
    control_ext: str = "mstm-ctrl"
    receipt_ext: str = "mstm-rcpt"
    thanks_ext: str = "mstm-thanks"
    overwrite: bool = False
    max_control_bytes: int = 8 << 20
    poll_interval: float = 3.0
    stop_file: str = ".stop"
    abandoned_batch_seconds: float = 86400.0  # 0: abandoned batch directories stay

    @classmethod
    def from_config(cls, cfg: StreamConfig) -> Settings:
        inc = cfg.incoming
        return cls(
            stream=cfg.name,
            directory=cfg.directory,
            incoming_dir=inc.incoming_dir or cfg.directory / ".mstm-incoming",
            control_ext=inc.control_file_extension,
            receipt_ext=inc.receipt_file_extension,
            thanks_ext=inc.thankyou_file_extension,
            overwrite=inc.overwrite,
            max_control_bytes=inc.max_control_bytes,
            poll_interval=cfg.poll_interval,
            stop_file=inc.stop_file,
            abandoned_batch_seconds=inc.abandoned_batch_seconds,
        )


@dataclass
class Summary:
    batches: int = 0
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    thanked: int = 0
    quarantined: int = 0
    deferred: int = 0
    abandoned: int = 0  # abandoned batch directories removed
    statuses: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Summary) -> None:
        """Add *other*'s item counts (not its batches, thank-yous or quarantines)."""
        self.ok += other.ok
        self.failed += other.failed
        self.bytes += other.bytes
        for key, n in other.statuses.items():
            self.statuses[key] = self.statuses.get(key, 0) + n

    def count(self, status: Status, size: int) -> None:
        self.statuses[status.value] = self.statuses.get(status.value, 0) + 1
        if status is Status.OK:
            self.ok += 1
            self.bytes += size
        else:
            self.failed += 1
