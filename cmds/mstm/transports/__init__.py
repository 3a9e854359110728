"""Transports: one module per protocol, all behind transports.base.Transport.

* base.py: the Transport interface, what it returns, and TransportOptions (what every
  transport is given); make_transport below builds the one a stream's configuration
  names.
* local.py (with local_tree.py), sftp.py (with sftp_requests.py), ftp.py (with
  ftp_commands.py): the transports that move the bytes themselves; common.py holds what
  they share, publish.py the publishing sftp and ftp share.
* rsync_ssh.py (with ssh.py, the connection, and stream.py, large files) and
  rsync_native.py: the rsync transports; rsync.py drives the rsync program (for them
  and for mstm.pull).
* remote/: the programs run at a target (rsync_ssh, stream.py, sftp).
* memory.py: a target in memory, for the tests.
"""

from __future__ import annotations

from pathlib import Path

from mstm.config import StreamConfig
from mstm.errors import ConfigError
from mstm.transports.base import Transport, TransportOptions


def make_transport(stream: StreamConfig, *, runtime_dir: Path | None = None) -> Transport:
    """The transport a stream's configuration names, ready to open().

    ``follow_symlinks`` reaches every transport as "a file item that is a symbolic link
    is sent as the file it points to" -- only for ``transfer_unit = file``: the scanner
    queues links only then, and inside a directory unit nothing is ever followed (links
    there travel as links, see each transport).
    """
    out = stream.outgoing
    options = TransportOptions(
        source_dir=stream.directory, target_dir=out.target_dir,
        stall_seconds=out.stall_seconds, connect_timeout=out.connect_timeout,
        bwlimit=out.bwlimit, stop_file=out.stop_file,
        # where a target's stop file is looked for
        stop_dirs=(out.target_incoming_dir if out.target_uses_arrival_monitor
                   else out.target_dir,),
        follow_symlinks=stream.follow_symlinks and stream.transfer_unit == "file")
    if out.transfer_protocol == "rsync_ssh":
        from mstm.transports.rsync_ssh import RsyncSsh
        from mstm.transports.ssh import SshConnection, SshTarget

        rs = stream.rsync_ssh
        conn = SshConnection(
            SshTarget(host=out.target_host, port=out.target_port, user=rs.username,
                      identity_file=rs.identity_file, known_hosts=rs.known_hosts,
                      connect_timeout=out.connect_timeout, ssh_cmd=rs.ssh_cmd,
                      # a hung connection ends after ~stall_seconds, never later than 30 s
                      alive_interval=min(10, max(1, int(out.stall_seconds / 3))),
                      config_file=rs.ssh_config),
            runtime_dir=runtime_dir)
        return RsyncSsh(options, conn=conn, rsync_cmd=rs.cmd)
    if out.transfer_protocol == "local":
        from mstm.transports.local import Local

        return Local(options)
    if out.transfer_protocol == "rsync_native":
        from mstm.transports.rsync_native import RsyncNative

        rn = stream.rsync_native
        return RsyncNative(options, host=out.target_host, port=out.target_port or 873,
                           module=rn.module or "", username=rn.username,
                           password_file=rn.password_file, rsync_cmd=rn.cmd)
    if out.transfer_protocol == "sftp":
        from mstm.transports.sftp import Sftp

        sf = stream.sftp
        return Sftp(options, host=out.target_host, port=out.target_port,
                    username=sf.username, identity_file=sf.identity_file,
                    known_hosts=sf.known_hosts, ssh_config=sf.ssh_config,
                    remote_checksum=sf.remote_checksum,
                    verify_readback=sf.verify_readback)
    if out.transfer_protocol in ("ftp", "ftps"):
        from mstm.transports.ftp import Ftp

        fc = stream.ftp
        return Ftp(options, host=out.target_host, port=out.target_port or 21,
                   username=fc.username,
                   password_file=fc.password_file, tls=fc.tls, ca_file=fc.ca_file,
                   passive=fc.passive, verify_readback=fc.verify_readback)
    raise ConfigError(f"transfer_protocol {out.transfer_protocol!r} is not implemented yet",
                      file=str(stream.stream_file), section="outgoing", key="transfer_protocol")
