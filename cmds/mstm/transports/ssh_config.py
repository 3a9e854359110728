"""What the admin's ssh client configuration says for a host alias, for paramiko (sftp).

OpenSSH's ssh reads it itself (rsync_ssh passes ``-F`` at most); paramiko does not, so
sftp asks here for the alias's HostName, Port and User, as ``ssh`` would apply them.
"""

from __future__ import annotations

import io
import logging
import os
import pwd
from pathlib import Path

import paramiko

from mstm.errors import ConfigError

log = logging.getLogger("mstm.sftp")


def host_entry(alias: str, config_file: Path | None) -> dict[str, str]:
    """What the ssh client configuration says for *alias* (paramiko.SSHConfig, which reads
    OpenSSH's format; first value wins, as in ssh): *config_file* alone, as ``ssh -F``;
    without it ~/.ssh/config of the user we run as, then /etc/ssh/ssh_config, if present.

    A *config_file* that cannot be read or parsed is a configuration error; a default file
    that cannot be is skipped with a warning.
    """
    if config_file is not None:
        files, given = [str(config_file)], True
    else:
        files = [os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ssh", "config"),
                 "/etc/ssh/ssh_config"]
        files, given = [f for f in files if os.path.isfile(f)], False
    config = paramiko.SSHConfig()
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            paramiko.SSHConfig.from_text(text)  # whole, or not at all
        except (OSError, UnicodeDecodeError, paramiko.SSHException, ValueError) as err:
            if given:
                raise ConfigError(f"{path}: cannot be read as an ssh configuration: {err}",
                                  section="sftp", key="ssh_config") from None
            log.warning("ignoring the ssh configuration %s: %s", path, err)
            continue
        config.parse(io.StringIO(text))
    if not files:
        return {}
    try:
        # the keys used here (hostname, port, user) have one text value each
        return {k: v for k, v in config.lookup(alias).items() if isinstance(v, str)}
    # a Match it cannot evaluate ("Match exec" needs the invoke package, which may be absent)
    except (paramiko.SSHException, ValueError, ImportError, OSError) as err:
        if given:
            raise ConfigError(f"{files[0]}: {err}", section="sftp", key="ssh_config") from None
        log.warning("ignoring the ssh configuration for %s: %s", alias, err)
        return {}


def config_port(text: object, alias: str, ssh_config: Path | None) -> int:
    """The Port of *alias*'s Host entry (22 if none), or a configuration error."""
    if text is None or text == "":
        return 22
    value = str(text)
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ConfigError(f"the ssh configuration gives Host {alias} the port {value[:40]!r};"
                          " expected a number from 1 to 65535",
                          file=str(ssh_config) if ssh_config else None,
                          section="sftp", key="ssh_config")
    return int(value)
