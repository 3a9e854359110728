"""Transports: one module per protocol, all behind transports.base.Transport."""

from __future__ import annotations

from pathlib import Path

from mstm.config import StreamConfig
from mstm.errors import ConfigError
from mstm.transports.base import Transport


def make_transport(stream: StreamConfig, *, runtime_dir: Path | None = None) -> Transport:
    """The transport a stream's configuration names, ready to open()."""
    out = stream.outgoing
    if out.transfer_protocol == "rsync_ssh":
        from mstm.transports.rsync_ssh import RsyncSsh
        from mstm.transports.ssh import SshConnection, SshTarget

        rs = stream.rsync_ssh
        conn = SshConnection(
            SshTarget(host=out.target_host, port=out.target_port, user=rs.username,
                      identity_file=rs.identity_file, known_hosts=rs.known_hosts,
                      connect_timeout=out.connect_timeout, ssh_cmd=rs.ssh_cmd),
            runtime_dir=runtime_dir)
        return RsyncSsh(conn=conn, source_dir=stream.directory, target_dir=out.target_dir,
                        rsync_cmd=rs.cmd, stall_seconds=out.stall_seconds, bwlimit=out.bwlimit,
                        stop_file=out.stop_file)
    raise ConfigError(f"transfer_protocol {out.transfer_protocol!r} is not implemented yet",
                      file=str(stream.stream_file), section="outgoing", key="transfer_protocol")
