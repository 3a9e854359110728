"""mstm-generator: a systemd generator (systemd.generator(7)) that grants each stream's
units write access to the paths the stream's own configuration says it must write.

systemd runs it early at boot and again on every ``systemctl daemon-reload``, with three
output directories; it writes only into the first (the "normal" one, under /run), one
drop-in per unit:

    mstm-stream@<name>.service.d/50-mstm-write-paths.conf
    mstm-send-once@<name>.service.d/50-mstm-write-paths.conf
    mstm-diskwatch.service.d/50-mstm-write-paths.conf      (every stream's directory)

each holding ``ReadWritePaths=`` lines for the paths mstm.sandbox.write_paths names (move
mode: the stream's directory; pull: its local target; a spool outside /var/spool/mstm).
So an admin grants a stream's write paths in one place, the stream's file
(``[data_stream] directory``), and both the continuous unit and the timer's one-off runs
honour it.

A generator must be quick, must never fail the boot and must write nowhere else: every
problem (no configuration, a broken stream file) is one line on stderr (the journal),
the other streams still get their drop-ins, and the exit status is always 0.
"""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

from mstm import config
from mstm.errors import ConfigError
from mstm.sandbox import DROPIN_NAME, Declared, declared_streams, unit_line, write_paths

PROG = "mstm-generator"
SERVICE_USER = "mstm"  # User= of the units
SERVICE_HOME = "/var/lib/mstm"  # its home (conf/mstm.sysusers), if the user is not there
STREAM_UNITS = ("mstm-stream@{}.service", "mstm-send-once@{}.service")
DISKWATCH_UNIT = "mstm-diskwatch.service"
HEADER = ("# Written by mstm-generator from {source} at each boot and daemon-reload;\n"
          "# do not edit (change the stream's configuration, then systemctl daemon-reload).\n"
          "[Service]\n")


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, default_config: str | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        say("usage: mstm-generator NORMAL_DIR [EARLY_DIR LATE_DIR] (systemd runs it)")
        return 0
    try:
        # a "~" in the configuration means the service user's home, as the units see it,
        # not that of root (or none: HOME is unset when systemd runs generators)
        os.environ["HOME"] = service_home()
        generate(Path(args[0]), _config_path(default_config))
    except Exception as err:  # never fail the boot: say it, exit 0
        say(f"internal error, no drop-ins written: {type(err).__name__}: {err}")
    return 0


def service_home(user: str = SERVICE_USER) -> str:
    """The home of the user the units run as (conf/mstm.sysusers), as they see it."""
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return SERVICE_HOME


def _config_path(default_config: str | None) -> Path:
    return Path(os.environ.get("MSTM_CONFIG") or default_config
                or str(config.default_config_path()))


def generate(out: Path, config_path: Path) -> list[Path]:
    """Write the drop-ins into *out*; the files written."""
    if not config_path.exists():
        return []  # mstm installed but not configured yet: nothing to grant
    try:
        streams, problems = declared_streams(config_path)
    except ConfigError as err:
        say(f"{err.message}; no drop-ins written")
        return []
    for problem in problems:
        say(f"{problem}; its units get no drop-in")
    written: list[Path] = []
    every: list[str] = []
    for cfg in streams:
        lines = _lines(cfg)
        if lines:
            for unit in STREAM_UNITS:
                written.append(_write(out, unit.format(cfg.name), cfg.stream_file, lines))
        line = unit_line(cfg.directory)
        if line is not None:  # mstm-diskwatch places .stop files in every directory
            every += [f"# stream {cfg.name}: [data_stream] directory", line]
    if every:
        written.append(_write(out, DISKWATCH_UNIT, config_path, every))
    return written


def _lines(cfg: Declared) -> list[str]:
    lines = []
    for wp in write_paths(cfg):
        line = unit_line(wp.path)
        if line is None:
            say(f"stream {cfg.name}: {wp.path!s:.200} cannot be written into a unit file as"
                " one word; grant it in a drop-in of your own (ReadWritePaths=, quoted)")
            continue
        lines += [f"# {wp.why}", line]
    return lines


def _write(out: Path, unit: str, source: Path, lines: list[str]) -> Path:
    d = out / f"{unit}.d"
    d.mkdir(parents=True, exist_ok=True)
    path = d / DROPIN_NAME
    path.write_text(HEADER.format(source=source) + "\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
