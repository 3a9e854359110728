"""`make install DESTDIR=... PREFIX=...` puts everything in place, with the final paths
(not DESTDIR's) inside; `make uninstall` with the same variables removes exactly that,
and leaves an admin's own configuration alone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.conftest import need

from mstm.log import MESSAGE_IDS

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/opt/mstm-test"
COMMANDS = ("mstm-scan", "mstm-send", "mstm-receive", "mstm-diskwatch", "mstm-alert")
UNITS = ("mstm-stream@.service", "mstm-receive@.service", "mstm-diskwatch.service",
         "mstm-alert@.service", "mstm-alert.service", "mstm-send-once@.service",
         "mstm-send-once@.timer")
PAGES = ("man1/mstm-send.1", "man1/mstm-scan.1", "man1/mstm-receive.1",
         "man1/mstm-diskwatch.1", "man1/mstm-alert.1", "man5/mstm.conf.5",
         "man7/mstm.7", "man7/mstm-protocol.7")
ADMIN_CONFIG = "# the admin's own configuration\n[global]\ndata_stream_list = mine\n"


def make(target: str, destdir: Path, prefix: str = PREFIX) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["make", "-s", "-C", str(ROOT), target, f"DESTDIR={destdir}",
                        f"UNIT_BUILD={destdir.parent / (destdir.name + '-units')}",
                        f"PREFIX={prefix}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"make {target}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("make")
    need("pandoc")
    dest = tmp_path_factory.mktemp("destdir")
    (dest / "etc" / "mstm").mkdir(parents=True)
    (dest / "etc" / "mstm" / "global.ini").write_text(ADMIN_CONFIG)
    make("install", dest)
    return dest


def test_install_puts_commands_units_man_pages_and_examples_in_place(installed: Path) -> None:
    d = installed
    prefix = d / PREFIX.lstrip("/")
    for c in COMMANDS:
        link = prefix / "bin" / c
        assert link.is_symlink() and os.readlink(link) == f"{PREFIX}/lib/mstm/bin/{c}"
        assert (prefix / "lib" / "mstm" / "bin" / c).is_file()
    # a PREFIX systemd does not search (/opt/...): the systemd files go to /etc
    for u in UNITS:
        assert (d / "etc/systemd/system" / u).is_file(), u
    stream = (d / "etc/systemd/system/mstm-stream@.service").read_text()
    assert f"ExecStart={PREFIX}/bin/mstm-send --follow %i" in stream
    for page in PAGES:
        assert (prefix / "share" / "man" / page).is_file(), page
    assert (d / "etc/sysusers.d/mstm.conf").is_file()
    assert (d / "etc/tmpfiles.d/mstm.conf").is_file()
    assert (d / "usr/local/lib/systemd/catalog/mstm.catalog").is_file()  # (no /etc catalog)
    generator = d / "etc/systemd/system-generators/mstm-generator"
    assert generator.is_file() and os.access(generator, os.X_OK)
    assert generator.read_text().startswith(f"#!{PREFIX}/lib/mstm/bin/python3 -I\n")
    for c in COMMANDS:
        assert (prefix / "share/bash-completion/completions" / c).is_file(), c
        assert (prefix / "share/zsh/site-functions" / f"_{c}").is_file(), c
    assert (d / "etc/mstm/global.ini.example").is_file()
    assert (d / "etc/mstm/proj1.ini.example").is_file()


def test_an_admins_existing_configuration_is_never_overwritten(installed: Path) -> None:
    assert (installed / "etc/mstm/global.ini").read_text() == ADMIN_CONFIG
    # a file that did not exist is installed from its example
    example = (installed / "etc/mstm/proj1.ini.example").read_bytes()
    assert (installed / "etc/mstm/proj1.ini").read_bytes() == example


def test_the_installed_commands_run_and_name_no_destdir_path(installed: Path) -> None:
    venv = installed / PREFIX.lstrip("/") / "lib" / "mstm"
    # the shebang names the final path; run the script with the venv's own python
    script = venv / "bin" / "mstm-send"
    assert script.read_text().splitlines()[0] == f"#!{PREFIX}/lib/mstm/bin/python"
    r = subprocess.run([str(venv / "bin" / "python"), str(script), "--version"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "0." in r.stdout, r.stderr
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import systemd.journal, mstm.cli.send"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    leaks = [str(p) for p in installed.rglob("*")
             if p.is_file() and not p.is_symlink() and os.fsencode(installed) in p.read_bytes()]
    assert not leaks, f"files naming the DESTDIR: {leaks[:10]}"


def test_the_installed_package_carries_the_target_programs_and_the_mail_templates(
        installed: Path) -> None:
    """Not only .py files: the sh programs run at a target and the alert templates are
    package data, and the installed package must find every one of them."""
    venv = installed / PREFIX.lstrip("/") / "lib" / "mstm"
    check = ("from importlib.resources import files\n"
             "from mstm.transports.remote import program\n"
             "names = sorted(p.name for p in files('mstm.transports.remote').iterdir())\n"
             "for n in names:\n"
             "    if n.endswith(('.py', '.sh')) and n != '__init__.py':\n"
             "        assert program(n), n\n"
             "tpl = sorted(p.name for p in files('mstm.alert').joinpath('templates').iterdir())\n"
             "print(' '.join(names + tpl))\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", check],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shipped = set(r.stdout.split())
    for name in ("stage.py", "hasher.py", "stream_receiver.py", "sftp_inspect.py", "stage.sh",
                 "run_stage.sh", "inspect.sh", "put.sh", "await.sh", "exchange.sh",
                 "alert.subject", "alert.txt", "alert.html", "failure.txt"):
        assert name in shipped, name

def test_the_journal_catalog_and_sysusers_file_are_valid(installed: Path,
                                                         tmp_path: Path) -> None:
    journalctl = need("journalctl")
    root = tmp_path / "root"
    (root / "usr/lib/systemd/catalog").mkdir(parents=True)
    shutil.copy(installed / "usr/local/lib/systemd/catalog/mstm.catalog",
                root / "usr/lib/systemd/catalog")
    subprocess.run([journalctl, f"--root={root}", "--update-catalog"], check=True,
                   capture_output=True)
    listed = subprocess.run([journalctl, f"--root={root}", "--list-catalog"], check=True,
                            capture_output=True, text=True).stdout
    for mid in MESSAGE_IDS.values():
        assert mid in listed, mid
    sysusers = need("systemd-sysusers")
    r = subprocess.run([sysusers, "--dry-run", f"--root={tmp_path / 'sysroot'}",
                        str(installed / "etc/sysusers.d/mstm.conf")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "mstm" in r.stdout + r.stderr, r.stdout + r.stderr


def test_uninstall_removes_exactly_what_install_added(installed: Path) -> None:
    make("uninstall", installed)
    assert tree(installed) == {"etc", "etc/mstm", "etc/mstm/global.ini"}
    assert (installed / "etc/mstm/global.ini").read_text() == ADMIN_CONFIG


def test_install_then_uninstall_in_an_empty_destdir_leaves_nothing(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    need("make")
    dest = tmp_path_factory.mktemp("empty-destdir")
    make("install", dest)
    assert len(tree(dest)) > 50
    make("uninstall", dest)
    assert tree(dest) == set()



# The trees dpkg owns: a local install must put nothing there (issue 14, 6).
DPKG_TREES = ("lib", "usr/lib", "usr/share", "usr/bin", "usr/sbin", "bin", "sbin")


def test_install_with_prefix_usr_local_writes_nothing_into_the_trees_dpkg_owns(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Units, generator, sysusers.d, tmpfiles.d and the catalog go where systemd 252 reads
    them below /usr/local (systemd-analyze unit-paths; systemd.generator(7); sysusers.d(5);
    tmpfiles.d(5); journalctl --update-catalog); configuration under /etc."""
    need("make")
    need("pandoc")
    dest = tmp_path_factory.mktemp("usr-local")
    make("install", dest, prefix="/usr/local")
    files = sorted(p.relative_to(dest) for p in dest.rglob("*") if not p.is_dir())
    in_dpkg = [str(f) for f in files if str(f).startswith(tuple(t + "/" for t in DPKG_TREES))]
    assert not in_dpkg, f"installed into dpkg's trees: {in_dpkg[:10]}"
    assert {f.parts[0] for f in files} == {"usr", "etc"}
    assert {f.parts[1] for f in files if f.parts[0] == "usr"} == {"local"}
    lib = dest / "usr/local/lib"
    for u in UNITS:
        assert (lib / "systemd/system" / u).is_file(), u
    assert (lib / "systemd/system-generators/mstm-generator").is_file()
    assert (lib / "sysusers.d/mstm.conf").is_file()
    assert (lib / "tmpfiles.d/mstm.conf").is_file()
    assert (lib / "systemd/catalog/mstm.catalog").is_file()
    assert (dest / "usr/local/share/bash-completion/completions/mstm-send").is_file()
    assert (dest / "usr/local/share/zsh/site-functions/_mstm-send").is_file()
    unit = (lib / "systemd/system/mstm-stream@.service").read_text()
    assert "ExecStart=/usr/local/bin/mstm-send --follow %i" in unit
    make("uninstall", dest, prefix="/usr/local")
    assert tree(dest) == set()


def test_the_usr_local_directories_are_ones_systemd_reads() -> None:
    """What the Makefile chooses for PREFIX=/usr/local, checked against this systemd."""
    analyze = need("systemd-analyze")
    paths = subprocess.run([analyze, "unit-paths"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "/usr/local/lib/systemd/system" in paths
    # the generator and catalog directories are compiled into systemd's shared library
    shared = sorted(Path("/usr/lib").glob("*/systemd/libsystemd-shared-*.so"))
    if shared:
        blob = shared[0].read_bytes()
        for path in (b"/usr/local/lib/systemd/system-generators",
                     b"/usr/local/lib/systemd/catalog"):
            assert path in blob, path
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "-p", "-n", "PREFIX=/usr/local",
                        "units"], capture_output=True, text=True)
    chosen = dict(line.split(" := ", 1) if " := " in line else line.split(" = ", 1)
                  for line in r.stdout.splitlines()
                  if line.startswith(("UNITDIR ", "GENERATORDIR ", "SYSUSERSDIR ",
                                      "TMPFILESDIR ", "CATALOGDIR ")))
    assert chosen == {"UNITDIR": "/usr/local/lib/systemd/system",
                      "GENERATORDIR": "/usr/local/lib/systemd/system-generators",
                      "SYSUSERSDIR": "/usr/local/lib/sysusers.d",
                      "TMPFILESDIR": "/usr/local/lib/tmpfiles.d",
                      "CATALOGDIR": "/usr/local/lib/systemd/catalog"}, chosen
