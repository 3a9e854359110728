"""mstm-generator (units/generator/, mstm.cli.generator): the stream's own file is the one
place its write paths are granted, for mstm-stream@ and mstm-send-once@ alike
(issue 14, 6).  The same under a real systemd: tests/system/systemd_scenarios.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import need

from mstm.cli.generator import generate, main
from mstm.sandbox import DROPIN_NAME, unit_line

ROOT = Path(__file__).resolve().parents[2]


def write_config(base: Path, streams: dict[str, str], spool: Path | None = None) -> Path:
    etc = base / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "global.ini").write_text(
        f"[global]\ndata_stream_list = {' '.join(streams)}\n"
        f"spool_base_dir = {spool or '/var/spool/mstm'}\n")
    for name, body in streams.items():
        (etc / f"{name}.ini").write_text(body)
    return etc / "global.ini"


def push(directory: Path, mode: str) -> str:
    return (f"[data_stream]\ndirectory = {directory}\n[outgoing]\ntarget_host = example.org\n"
            f"target_dir = /archive\ntransfer_mode = {mode}\n")


def dropin(out: Path, unit: str) -> str | None:
    path = out / f"{unit}.d" / DROPIN_NAME
    return path.read_text() if path.exists() else None


def rw_paths(text: str | None) -> list[str]:
    return [line.split("=", 1)[1] for line in (text or "").splitlines()
            if line.startswith("ReadWritePaths=")]


def test_a_move_stream_gets_its_directory_in_both_units(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"proj1": push(Path("/data/out/proj1"), "move")})
    out = tmp_path / "gen"
    generate(out, cfg)
    for unit in ("mstm-stream@proj1.service", "mstm-send-once@proj1.service"):
        text = dropin(out, unit)
        assert text is not None and text.count("[Service]") == 1, unit
        assert rw_paths(text) == ["-/data/out/proj1"], text
        assert "move mode deletes delivered sources" in text
    # mstm-diskwatch places its .stop files in every stream's directory
    assert rw_paths(dropin(out, "mstm-diskwatch.service")) == ["-/data/out/proj1"]


def test_a_mirror_stream_needs_nothing_beyond_the_units_own_paths(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"m": push(Path("/data/out/m"), "mirror")})
    out = tmp_path / "gen"
    generate(out, cfg)
    assert dropin(out, "mstm-stream@m.service") is None
    assert dropin(out, "mstm-send-once@m.service") is None


def test_a_spool_outside_the_default_and_a_pull_target_are_granted(tmp_path: Path) -> None:
    pull = ("[data_stream]\ndirection = pull\ndirectory = /data/in/p\n"
            "[outgoing]\ntarget_host = hpc.example.org\n"
            "[pull]\nsource_dir = /remote/out\n"
            "map = ^(run[0-9]+)_ -> /data/runs/\\1/raw\n")
    cfg = write_config(tmp_path, {"p": pull, "s": push(Path("/data/out/s"), "move")},
                       spool=Path("/srv/spool"))
    out = tmp_path / "gen"
    generate(out, cfg)
    assert rw_paths(dropin(out, "mstm-send-once@p.service")) == [
        "-/data/in/p", "-/data/runs", "-/srv/spool/p"]
    assert rw_paths(dropin(out, "mstm-stream@s.service")) == ["-/data/out/s", "-/srv/spool/s"]


def test_a_broken_stream_file_costs_only_that_streams_drop_ins_and_never_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, {"good": push(Path("/data/good"), "move"),
                                  "bad": "[data_stream]\ndirectory = relative/path\n"})
    out = tmp_path / "gen"
    assert main([str(out), str(out) + ".early", str(out) + ".late"],
                default_config=str(cfg)) == 0
    assert rw_paths(dropin(out, "mstm-stream@good.service")) == ["-/data/good"]
    assert dropin(out, "mstm-stream@bad.service") is None
    err = capsys.readouterr().err
    assert err.startswith("mstm-generator: stream bad: ") and "no drop-in" in err
    # nothing else was written: only the output directory, only drop-in directories
    assert {p.name for p in out.iterdir()} == {"mstm-stream@good.service.d",
                                              "mstm-send-once@good.service.d",
                                              "mstm-diskwatch.service.d"}
    assert not (tmp_path / "gen.early").exists() and not (tmp_path / "gen.late").exists()


def test_no_configuration_writes_nothing_and_exits_0(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSTM_CONFIG", raising=False)
    out = tmp_path / "gen"
    assert main([str(out)], default_config=str(tmp_path / "none/global.ini")) == 0
    assert not out.exists()
    bad = tmp_path / "global.ini"
    bad.write_text("[global]\ndata_stream_list = a a\n")
    assert main([str(out)], default_config=str(bad)) == 0
    assert not out.exists()


def test_paths_systemd_would_split_or_expand_are_escaped_or_left_to_the_admin() -> None:
    assert unit_line(Path("/data/50%")) == "ReadWritePaths=-/data/50%%"
    assert unit_line(Path("/data/with space")) is None
    assert unit_line(Path('/data/"q"')) is None


def test_the_rendered_generator_runs_quickly_and_its_drop_ins_pass_systemd_analyze(
        tmp_path: Path) -> None:
    need("make")
    analyze = need("systemd-analyze")
    venv = Path(sys.executable).parent.parent  # the rendered shebang: <venv>/bin/python3
    build = tmp_path / "build"
    subprocess.run(["make", "-s", "-C", str(ROOT), "units", f"UNIT_BUILD={build}",
                    f"PKGLIBDIR={venv}", f"BINDIR={venv / 'bin'}"],
                   check=True, capture_output=True, text=True)
    src = tmp_path / "src"
    src.mkdir()
    cfg = write_config(tmp_path, {"proj1": push(src, "move")})
    out = tmp_path / "normal"
    start = time.monotonic()
    (build / "generator/mstm-generator").chmod(0o755)  # as make install does
    r = subprocess.run([str(build / "generator/mstm-generator"), str(out),
                        str(tmp_path / "early"), str(tmp_path / "late")],
                       capture_output=True, text=True, env={"MSTM_CONFIG": str(cfg)})
    took = time.monotonic() - start
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert took < 5, f"the generator took {took:.1f} s"
    assert rw_paths(dropin(out, "mstm-send-once@proj1.service")) == [f"-{src}"]
    # the unit with the generated drop-in, as systemd would load it
    units = tmp_path / "units"
    units.mkdir()
    unit = units / "mstm-send-once@proj1.service"
    unit.write_text((build / "mstm-send-once@.service").read_text())
    (units / "mstm-send-once@proj1.service.d").mkdir()
    (units / "mstm-send-once@proj1.service.d" / DROPIN_NAME).write_text(
        dropin(out, "mstm-send-once@proj1.service") or "")
    r = subprocess.run([analyze, "--system", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, cwd=units)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_a_tilde_in_the_configuration_is_the_service_users_home_not_roots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case: systemd runs generators as root with no HOME; the units run as
    user mstm (HOME=/var/lib/mstm).  A grant of /root/... would let the stream deliver,
    then fail to delete, and park the item."""
    import mstm.cli.generator as generator

    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setattr(generator, "service_home", lambda user="mstm": "/var/lib/mstm")
    cfg = write_config(tmp_path, {"proj1": push(Path("~/outgoing/p1"), "move")})
    out = tmp_path / "gen"
    assert main([str(out)], default_config=str(cfg)) == 0
    assert rw_paths(dropin(out, "mstm-stream@proj1.service")) == ["-/var/lib/mstm/outgoing/p1"]


def test_the_service_home_comes_from_the_password_database_or_the_sysusers_default() -> None:
    from mstm.cli.generator import SERVICE_HOME, service_home

    assert service_home("root") == "/root"
    assert service_home("no-such-user-here") == SERVICE_HOME == "/var/lib/mstm"
    assert "/var/lib/mstm" in (ROOT / "conf/mstm.sysusers").read_text()
