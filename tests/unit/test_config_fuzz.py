"""Property: whatever is done to the shipped examples (conf/global.ini, conf/proj1.ini),
`mstm-send --check proj1` exits 0 or 78, never 70, never with a traceback, and a 78 is
exactly one line on stderr.

Values are replaced by random text, numbers, huge numbers and $(section:key)
references; keys are deleted, duplicated, commented in; garbage lines are inserted,
sections renamed, the files made FIFOs, directories or symlink loops, and the stream's
directory exists or not.  Each example runs the real click command in this process;
some also run the installed executable, to prove the same on a real stderr.

MSTM_FUZZ_EXAMPLES sets the number of examples (default 60; `make torture` runs 500).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mstm.cli.send import main as send_main
from mstm.config import SCHEMA
from mstm.errors import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
MSTM_SEND = Path(sys.executable).parent / "mstm-send"
EXAMPLES = int(os.environ.get("MSTM_FUZZ_EXAMPLES", "60"))
KEY_LINE = re.compile(r"^(#?)([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")

SECTIONS = list(SCHEMA)
KEYS = [(s, k) for s in SCHEMA for k in SCHEMA[s]]

# ------------------------------------------------------------------ what a value may become

HUGE = st.sampled_from(["9" * 400, "1" + "0" * 4400, "1e30", "1e308", "1e400", "inf", "-inf",
                        "nan", "-0", "-1", "0", "0.0000000001", "99999999999999999999999 TiB",
                        "1e400k", "8761h", "65536", "2147483648", "18446744073709551616"])
NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.tuples(st.integers(0, 10**30), st.sampled_from(["", "s", "m", "h", "K", "M", "G", "T",
                                                       "TiB", "%", " kb", "d"]))
    .map(lambda t: f"{t[0]}{t[1]}"))
REFERENCES = st.one_of(
    st.sampled_from(KEYS).map(lambda r: f"$({r[0]}:{r[1]})"),
    st.tuples(st.sampled_from([*SECTIONS, "global", "nowhere", ""]),
              st.text(alphabet="abcdefghijklmnopqrstuvwxyz_:$()", max_size=12))
    .map(lambda t: f"$({t[0]}:{t[1]})"),
    st.sampled_from(["$(", "$(global", "$()", "$(:)", "$(global:)", "$(global:x", "$$(x:y)",
                     "/a/$(outgoing:target_dir)", "$(data_stream:directory)/x"]))
SPECIAL = st.sampled_from(['"/data"', "'/x'", "relative/path", "/a\0b", "{0}", "{name}",
                           "{name}{name}", "{name.__class__}", "{", "}", "{nam}",
                           "{name}/../x", "/abs/{name}", "", " ", "proj1 proj1", "a/b", "..",
                           "x" * 300, "true", "maybe", "move", "mirror", "rsync_native", "ftp",
                           "local", "pull", "/nonexistent/file", "/dev/zero", "/", "~", "~nobody",
                           "-rf", "a b", "é", "\u2028", "[x]", "=", "#", ";"])
VALUES = st.one_of(HUGE, NUMBERS, REFERENCES, SPECIAL,
                   st.text(max_size=40),
                   st.lists(st.one_of(REFERENCES, SPECIAL, st.text(max_size=8)), max_size=4)
                   .map("".join))
GARBAGE = st.one_of(st.text(max_size=60), st.sampled_from([
    "[", "]", "[]", "[global", "no equals sign", "= value", "  indented continuation",
    "[DEFAULT]", "[data_stream]", "[outgoing]", "key = value", "\ufeff[global]", "%(x)s",
    "directory = /x", "data_stream_list = proj1 proj1"]))


@dataclass
class Mutation:
    """One edit of one of the two files, as lines."""

    target: str  # "global" or "stream"
    op: str
    index: int
    value: str = ""
    extra: str = ""


MUTATIONS = st.builds(
    Mutation,
    target=st.sampled_from(["global", "stream"]),
    op=st.sampled_from(["set", "set", "set", "uncomment", "uncomment", "delete", "duplicate",
                        "garbage", "rename_section", "new_key", "continuation"]),
    index=st.integers(min_value=0, max_value=10_000),
    value=VALUES,
    extra=st.one_of(st.sampled_from([k for _, k in KEYS]), st.text(max_size=10)))


@dataclass
class Case:
    mutations: list[Mutation]
    stream_dir_exists: bool
    global_kind: str  # regular, fifo, directory, missing, loop
    stream_kind: str
    subprocess: bool
    notes: list[str] = field(default_factory=list)


KINDS = st.sampled_from(["regular"] * 12 + ["fifo", "directory", "missing", "loop"])
CASES = st.builds(Case, mutations=st.lists(MUTATIONS, min_size=0, max_size=6),
                  stream_dir_exists=st.booleans(), global_kind=KINDS, stream_kind=KINDS,
                  subprocess=st.integers(0, 9).map(lambda n: n == 0))


# ------------------------------------------------------------------ applying a case

def _base(root: Path) -> dict[str, list[str]]:
    glob = (ROOT / "conf" / "global.ini").read_text().splitlines()
    at = glob.index("[global]") + 1
    glob[at:at] = [f"spool_base_dir = {root}/spool", f"runtime_dir = {root}/run"]
    stream = [line.replace("/data/outgoing/proj1", f"{root}/data/proj1")
              for line in (ROOT / "conf" / "proj1.ini").read_text().splitlines()]
    return {"global": glob, "stream": stream}


def _mutate(lines: list[str], m: Mutation) -> None:
    if not lines:
        lines.append("")
    i = m.index % len(lines)
    keyed = [n for n, line in enumerate(lines) if KEY_LINE.match(line)]
    if m.op in ("set", "uncomment") and keyed:
        n = keyed[m.index % len(keyed)]
        match = KEY_LINE.match(lines[n])
        assert match
        if m.op == "set" or match.group(1):
            lines[n] = f"{match.group(2)} = {m.value}"
    elif m.op == "delete":
        del lines[i]
    elif m.op == "duplicate":
        lines.insert(i, lines[i])
    elif m.op == "garbage":
        lines.insert(i, m.value if m.index % 2 else m.extra)
    elif m.op == "rename_section":
        headers = [n for n, line in enumerate(lines) if line.startswith("[")]
        if headers:
            lines[headers[m.index % len(headers)]] = f"[{m.extra or m.value}]"
    elif m.op == "new_key":
        lines.insert(i, f"{m.extra} = {m.value}")
    elif m.op == "continuation":
        lines.insert(i, f"    {m.value}")


def _write(path: Path, lines: list[str], kind: str) -> None:
    text = "\n".join(lines) + "\n"
    if kind == "regular":
        path.write_text(text.replace("\0", "\\0"), errors="surrogateescape")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "loop":
        os.symlink(path.with_suffix(".loop"), path)
        os.symlink(path, path.with_suffix(".loop"))
    # "missing": nothing


def _build(root: Path, case: Case) -> Path:
    files = _base(root)
    for m in case.mutations:
        _mutate(files[m.target], m)
    (root / "spool").mkdir()
    if case.stream_dir_exists:
        (root / "data" / "proj1").mkdir(parents=True)
    g = root / "global.ini"
    _write(g, files["global"], case.global_kind)
    _write(root / "proj1.ini", files["stream"], case.stream_kind)
    return g


# ------------------------------------------------------------------ the property

class Hung(AssertionError):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail (rather than hang the suite) when --check blocks, e.g. reading a FIFO."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"--check did not return within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _assert_outcome(code: int | None, stdout: str, stderr: str, where: str) -> None:
    assert "Traceback" not in stderr, f"{where}: {stderr}"
    assert "internal error" not in stderr, f"{where}: {stderr}"
    assert code in (0, EXIT_CONFIG), f"{where}: exit {code}: {stderr}"
    if code == EXIT_CONFIG:
        lines = stderr.splitlines()
        assert len(lines) == 1, f"{where}: not one line: {stderr!r}"
        assert lines[0].startswith("mstm-send: "), lines[0]
    else:
        assert stdout.endswith(": ok\n"), f"{where}: {stdout!r} {stderr!r}"


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(case=CASES)
def test_any_mutation_of_the_examples_gives_0_or_78_in_one_line(case: Case) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MSTM_CONFIG", "RUNTIME_DIRECTORY", "JOURNAL_STREAM",
                        "CREDENTIALS_DIRECTORY")}
    with tempfile.TemporaryDirectory(prefix="mstm-fuzz-") as tmp:
        root = Path(tmp)
        g = _build(root, case)
        with _deadline(30):
            r = CliRunner().invoke(send_main, ["--config", str(g), "--check", "proj1"], env={
                "MSTM_CONFIG": None, "RUNTIME_DIRECTORY": None, "JOURNAL_STREAM": None,
                "CREDENTIALS_DIRECTORY": None})
        if isinstance(r.exception, Hung):
            raise r.exception
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        _assert_outcome(r.exit_code, r.stdout, r.stderr, "in process")
        event(f"exit {r.exit_code}")
        if case.subprocess:
            p = subprocess.run([str(MSTM_SEND), "--config", str(g), "--check", "proj1"],
                               capture_output=True, text=True, env=env, cwd=root, timeout=60,
                               check=False)
            _assert_outcome(p.returncode, p.stdout, p.stderr, "mstm-send")
            assert p.returncode == r.exit_code


def test_the_unmutated_examples_pass_the_check() -> None:
    with tempfile.TemporaryDirectory(prefix="mstm-fuzz-") as tmp:
        root = Path(tmp)
        g = _build(root, Case([], True, "regular", "regular", False))
        r = CliRunner().invoke(send_main, ["--config", str(g), "--check", "proj1"])
        assert r.exit_code == 0, r.stderr
