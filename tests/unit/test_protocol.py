"""mstm.protocol: the control, receipt and thank-you files, and MiStaMover's."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mstm import protocol
from mstm import protocol as p
from mstm.protocol import Control, ControlItem, ProtocolError, Receipt, Status, files

D0 = "0" * 64
DIGEST = hashlib.sha256(b"x").hexdigest()


def control(*items: ControlItem, batch: str = "b1") -> Control:
    return Control(batch, "sha256", f"{batch}.mstm-rcpt", tuple(items))


def control_bytes(*lines: str, batch: str = "b1") -> bytes:
    head = ["mstm-control 1", f"batch {batch}", "algorithm sha256", f"receipt {batch}.mstm-rcpt"]
    return ("\n".join([*head, *lines, "end"]) + "\n").encode()


# --------------------------------------------------------------------------- names


def test_new_batch_ids_match_the_batch_pattern_and_differ() -> None:
    ids = {p.new_batch_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(p.BATCH_RE.match(i) for i in ids)


@pytest.mark.parametrize("batch", ["", ".b", "-b", "b/c", "b.c", "b c", "b\n", "x" * 65, "é"])
def test_invalid_batch_names_are_refused_everywhere(batch: str) -> None:
    assert not p.BATCH_RE.match(batch)
    for call in (lambda: p.render_thanks(batch),
                 lambda: p.file_names(batch, control_ext="c", receipt_ext="r", thanks_ext="t"),
                 lambda: p.render_control(control(batch=batch))):
        with pytest.raises(ProtocolError):
            call()


def test_file_names_are_derived_from_the_batch_and_extensions() -> None:
    assert p.file_names("b1", control_ext="mstm-ctrl", receipt_ext="mstm-rcpt",
                        thanks_ext="mstm-thanks") == (
        "b1.mstm-ctrl", "b1.mstm-rcpt", "b1.mstm-thanks")
    with pytest.raises(ProtocolError):
        p.file_names("b1", control_ext="../x", receipt_ext="r", thanks_ext="t")


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(("path", "encoded"), [
    ("plain/name.nc", "plain/name.nc"),
    ("with space", "with%20space"),
    ("new\nline", "new%0Aline"),
    ("100%", "100%25"),
    ("tab\tand\rcr", "tab%09and%0Dcr"),
    ("caf\u00e9", "caf%C3%A9"),
    (os.fsdecode(b"latin1-\xe9"), "latin1-%E9"),
    ("~!#$&'()*+,;=@[]^`{|}", "~!#$&'()*+,;=@[]^`{|}"),
])
def test_paths_are_percent_encoded_byte_by_byte_and_decode_back(path: str, encoded: str) -> None:
    assert p.encode_path(path) == encoded
    assert p.decode_path(encoded) == path


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/", "./a", "a/./b", "..", "../x",
                                  "a/../../x", "nul\0byte", "x" * 256, "a/" * 2048 + "b"])
def test_unsafe_paths_are_refused_by_both_encode_and_decode(path: str) -> None:
    with pytest.raises(ProtocolError):
        p.encode_path(path)
    raw = "".join(f"%{b:02X}" if not 0x21 <= b <= 0x7E or b == 0x25 else chr(b)
                  for b in os.fsencode(path))
    with pytest.raises(ProtocolError):
        p.decode_path(raw)


@pytest.mark.parametrize("text", ["%41", "a%2f", "a%2F", "%e9", "%", "%4", "%ZZ", "a b",
                                  "a\nb", "caf\u00e9", ""])
def test_non_canonical_or_malformed_encodings_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        p.decode_path(text)


# --------------------------------------------------------------------------- control


def test_control_round_trips_names_with_newline_space_percent_and_bad_bytes() -> None:
    names = ["a/b/c.nc", "with space", "new\nline", "100%/x%41", os.fsdecode(b"\xff\xfe/z"),
             "tab\there", "crlf\r\n"]
    c = control(*(ControlItem(n, i * 1000, hashlib.sha256(n.encode("utf-8",
                                                                   "surrogateescape")).hexdigest())
                  for i, n in enumerate(names)))
    data = p.render_control(c)
    assert data.isascii() and data.count(b"\n") == len(names) + 5
    assert p.parse_control(data) == c


def test_control_file_layout_is_the_documented_one() -> None:
    c = control(ControlItem("a b", 3, DIGEST))
    assert p.render_control(c) == (
        b"mstm-control 1\nbatch b1\nalgorithm sha256\nreceipt b1.mstm-rcpt\n"
        b"item 3 " + DIGEST.encode() + b" a%20b\nend\n")


def test_an_empty_batch_is_a_valid_control_file() -> None:
    assert p.parse_control(p.render_control(control())) == control()


def test_receipt_name_must_be_the_batch_with_the_configured_extension() -> None:
    """MiStaMover defect 13: a peer must not choose the name of a file we write."""
    data = p.render_control(control(ControlItem("a", 1, DIGEST)))
    with pytest.raises(ProtocolError, match="receipt"):
        p.parse_control(data, receipt_ext="other")
    for receipt in ("../x", "b1.mstm-ctrl", "b2.mstm-rcpt", ".b1.mstm-rcpt", "b1.mstm-rcpt/x"):
        bad = data.replace(b"receipt b1.mstm-rcpt", b"receipt " + receipt.encode())
        with pytest.raises(ProtocolError):
            p.parse_control(bad)


@pytest.mark.parametrize(("what", "data"), [
    ("unknown version", control_bytes().replace(b"mstm-control 1", b"mstm-control 2")),
    ("version 01", control_bytes().replace(b"mstm-control 1", b"mstm-control 01")),
    ("unknown algorithm", control_bytes().replace(b"sha256", b"md5")),
    ("missing end", control_bytes()[:-4]),
    ("no final newline", control_bytes()[:-1]),
    ("text after end", control_bytes() + b"item 1 " + D0.encode() + b" x\n"),
    ("CRLF", control_bytes(f"item 1 {D0} a").replace(b"\n", b"\r\n")),
    ("duplicate path", control_bytes(f"item 1 {D0} a", f"item 2 {D0} a")),
    ("same path spelt twice", control_bytes(f"item 1 {D0} a/b", f"item 1 {D0} a//b")),
    ("negative size", control_bytes(f"item -1 {D0} a")),
    ("size with leading zero", control_bytes(f"item 01 {D0} a")),
    ("size with plus", control_bytes(f"item +1 {D0} a")),
    ("huge size", control_bytes(f"item {2**63} {D0} a")),
    ("short digest", control_bytes(f"item 1 {D0[:-1]} a")),
    ("upper-case digest", control_bytes(f"item 1 {'A' * 64} a")),
    ("two spaces", control_bytes(f"item 1  {D0} a")),
    ("trailing space", control_bytes(f"item 1 {D0} a ")),
    ("unknown line", control_bytes("note hello")),
    ("no path", control_bytes(f"item 1 {D0}")),
    ("dot-dot", control_bytes(f"item 1 {D0} ../etc/passwd")),
    ("absolute", control_bytes(f"item 1 {D0} /etc/passwd")),
    ("encoded NUL", control_bytes(f"item 1 {D0} a%00b")),
    ("raw NUL", control_bytes(f"item 1 {D0} a\0b")),
    ("encoded slash", control_bytes(f"item 1 {D0} ..%2Fx")),
    ("not ASCII", control_bytes(f"item 1 {D0} caf\u00e9")),
    ("batch line missing", control_bytes().replace(b"batch b1\n", b"")),
    ("batch with dot", control_bytes(batch="b.1")),
    ("fields reordered", control_bytes().replace(b"batch b1\nalgorithm sha256",
                                                 b"algorithm sha256\nbatch b1")),
    ("empty", b""),
    ("only newline", b"\n"),
    ("binary", bytes(range(256))),
])
def test_malformed_control_files_raise_protocol_error(what: str, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_control(data)


def test_control_size_limit_is_checked_before_anything_else() -> None:
    data = control_bytes(*(f"item 1 {D0} f{i}" for i in range(100)))
    assert len(p.parse_control(data).items) == 100
    with pytest.raises(ProtocolError, match="larger"):
        p.parse_control(data, max_bytes=len(data) - 1)
    with pytest.raises(ProtocolError, match="larger"):
        p.parse_control(b"x" * (10 << 20))


def test_more_than_a_million_items_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_ITEMS", 3)  # where the reader looks it up
    ok = control_bytes(*(f"item 1 {D0} f{i}" for i in range(3)))
    assert len(p.parse_control(ok).items) == 3
    with pytest.raises(ProtocolError, match="more than"):
        p.parse_control(control_bytes(*(f"item 1 {D0} f{i}" for i in range(4))))


def test_render_control_refuses_what_parse_would_refuse() -> None:
    for bad in (control(ControlItem("../x", 1, DIGEST)),
                control(ControlItem("a", -1, DIGEST)),
                control(ControlItem("a", 1, "abc")),
                control(ControlItem("a", 1, DIGEST), ControlItem("a", 2, DIGEST)),
                Control("b1", "md5", "b1.mstm-rcpt", ()),
                Control("b1", "sha256", "b2.mstm-rcpt", ())):
        with pytest.raises(ProtocolError):
            p.render_control(bad)


def test_a_large_control_file_parses_quickly() -> None:
    import time

    c = control(*(ControlItem(f"dir{i % 100}/file {i}.nc", i, DIGEST) for i in range(50_000)))
    data = p.render_control(c)
    t0 = time.monotonic()
    assert p.parse_control(data) == c
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- receipt


def test_receipt_round_trips_every_status_and_odd_names() -> None:
    r = Receipt("b1", tuple((name, status) for name, status in zip(
        ["ok.nc", "new\nline", "sp ace", "100%", os.fsdecode(b"\xff"), "x/y"], Status,
        strict=True)))
    data = p.render_receipt(r)
    assert data.startswith(b"mstm-receipt 1\nbatch b1\nitem ok ok.nc\n")
    assert p.parse_receipt(data, batch="b1") == r


def test_status_values_are_the_documented_words() -> None:
    assert [s.value for s in Status] == ["ok", "bad-size", "bad-checksum", "missing",
                                         "io-error", "refused"]
    assert Status.OK == "ok"


@pytest.mark.parametrize("data", [
    b"mstm-receipt 1\nbatch b2\nend\n",
    b"mstm-receipt 2\nbatch b1\nend\n",
    b"mstm-receipt 1\nbatch b1\nitem fine a\nend\n",
    b"mstm-receipt 1\nbatch b1\nitem ok a\nitem ok a\nend\n",
    b"mstm-receipt 1\nbatch b1\nitem ok ../a\nend\n",
    b"mstm-receipt 1\nbatch b1\nitem ok /a\nend\n",
    b"mstm-receipt 1\nbatch b1\nitem ok a\n",
    b"mstm-receipt 1\nbatch b1\nitem ok\nend\n",
    b"mstm-control 1\nbatch b1\nend\n",
])
def test_malformed_or_foreign_receipts_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_receipt(data, batch="b1")


# --------------------------------------------------------------------------- thank-you


def test_thanks_round_trip_and_must_name_its_own_batch() -> None:
    data = p.render_thanks("b1")
    assert data == b"mstm-thanks 1\nbatch b1\nend\n"
    p.parse_thanks(data, batch="b1")
    with pytest.raises(ProtocolError):
        p.parse_thanks(data, batch="b2")
    for bad in (b"", data + b"\n", data.replace(b"1", b"2", 1), data[:-1],
                b"mstm-thanks 1\nbatch b1\nreceipt x\nend\n", b"x" * 5000):
        with pytest.raises(ProtocolError):
            p.parse_thanks(bad, batch="b1")


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=3000, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

_valid_control = p.render_control(control(ControlItem("a/b c", 5, DIGEST),
                                          ControlItem("d%", 0, D0)))
_valid_receipt = p.render_receipt(Receipt("b1", (("a/b c", Status.OK),
                                                 ("d%", Status.REFUSED))))
_valid_thanks = p.render_thanks("b1")
_tokens = [b"mstm-control 1", b"mstm-receipt 1", b"mstm-thanks 1", b"batch b1",
           b"algorithm sha256", b"receipt b1.mstm-rcpt", b"item", b"end", b"ok", b"refused",
           b"1", b"0", b"-1", b" ", b"\n", b"\r", b"\0", b"%", b"%0A", b"%00", b"%2F", b"..",
           b"/", D0.encode(), DIGEST.encode(), b"\xff", b"\xc3\xa9", b"99999999999999999999"]


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    """Valid files with a few bytes changed, cut, inserted or lines shuffled."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "insert", "token", "swap"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[pos] = draw(st.integers(0, 255))
            elif op == "cut":
                del data[pos:pos + draw(st.integers(1, 20))]
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif op == "token":
                data[pos:pos] = draw(st.sampled_from(_tokens))
            else:
                lines = bytes(data).split(b"\n")
                lines = draw(st.permutations(lines))
                data = bytearray(b"\n".join(lines))
        return bytes(data)

    return mutate()


_line_soup = st.lists(st.lists(st.sampled_from(_tokens), max_size=6).map(b" ".join),
                      max_size=12).map(lambda ls: b"\n".join(ls) + b"\n")
_garbage = st.one_of(st.binary(max_size=300), _line_soup)


def _only_protocol_errors(call: object) -> None:
    assert callable(call)
    try:
        call()
    except ProtocolError:
        pass


@FUZZ
@given(st.one_of(_mutations(_valid_control), _garbage))
def test_fuzzed_control_files_raise_nothing_but_protocol_error(data: bytes) -> None:
    try:
        c = p.parse_control(data)
    except ProtocolError:
        return
    # whatever is accepted is safe to use and renders back to the same bytes
    for item in c.items:
        assert p.check_path(item.relpath) == item.relpath
    assert p.render_control(c) == data


@FUZZ
@given(st.one_of(_mutations(_valid_receipt), _garbage))
def test_fuzzed_receipts_raise_nothing_but_protocol_error(data: bytes) -> None:
    try:
        r = p.parse_receipt(data, batch="b1")
    except ProtocolError:
        return
    assert p.render_receipt(r) == data


@FUZZ
@given(st.one_of(_mutations(_valid_thanks), _garbage))
def test_fuzzed_thank_you_files_raise_nothing_but_protocol_error(data: bytes) -> None:
    try:
        p.parse_thanks(data, batch="b1")
    except ProtocolError:
        return
    assert data == _valid_thanks


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.lists(st.binary(min_size=1, max_size=20).filter(
    lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b), min_size=1,
    max_size=5))
def test_every_safe_path_round_trips(parts: list[bytes]) -> None:
    path = os.fsdecode(b"/".join(parts))
    encoded = p.encode_path(path)
    assert re.fullmatch(r"[!-~]+", encoded)
    assert p.decode_path(encoded) == path


_msm_control = p.render_mistamover_control(p.MsmControl(
    "data.nc", 12, hashlib.md5(b"x").hexdigest(), ".data.nc.1400000000.25.mstm-rcpt"))
_msm_receipt = p.render_mistamover_receipt(p.MsmReceipt(
    "data.nc", p.MsmCode.SUCCESS, 12, hashlib.md5(b"x").hexdigest(),
    ".data.nc.1400000000.25.mstm-thanks"))


@FUZZ
@given(st.one_of(_mutations(_msm_control), _mutations(_msm_receipt), _garbage))
def test_fuzzed_mistamover_files_raise_nothing_but_protocol_error(data: bytes) -> None:
    _only_protocol_errors(lambda: p.parse_mistamover_control(data, receipt_ext="mstm-rcpt"))
    _only_protocol_errors(lambda: p.parse_mistamover_receipt(data))
    _only_protocol_errors(lambda: p.parse_mistamover_thanks(data))


# --------------------------------------------------------------------------- MiStaMover


def test_mistamover_control_file_is_read_as_its_code_wrote_it() -> None:
    """lib/ControlFile.py: start magic, name, size, md5, receipt name, end magic."""
    md5 = hashlib.md5(b"hello").hexdigest()
    data = (b"_start_stager_ctrl_data_\nobs 1.nc\n5\n" + md5.encode() +
            b"\n.obs 1.nc.1712345678.91.stager-rcpt-bss\n_end_stager_ctrl_data_\n")
    c = p.parse_mistamover_control(data, receipt_ext="stager-rcpt-bss")
    assert c == p.MsmControl("obs 1.nc", 5, md5, ".obs 1.nc.1712345678.91.stager-rcpt-bss")
    assert p.render_mistamover_control(c) == data
    assert p.is_mistamover(data)
    assert p.mistamover_control_name("obs 1.nc", control_ext="stager-ctrl-bss") == \
        ".obs 1.nc.stager-ctrl-bss"


@pytest.mark.parametrize("receipt", [
    "../../etc/passwd", "x.mstm-rcpt", ".other.1.mstm-rcpt", ".data.nc.mstm-rcpt",
    ".data.nc.12ab.mstm-rcpt", ".data.nc.1.mstm-ctrl", "data.nc.1.mstm-rcpt",
])
def test_mistamover_receipt_names_other_than_its_senders_shape_are_refused(receipt: str) -> None:
    """MiStaMover defect 13: the control file chose any name for the receipt."""
    md5 = hashlib.md5(b"x").hexdigest()
    data = p.render_mistamover_control(p.MsmControl("data.nc", 1, md5, receipt))
    with pytest.raises(ProtocolError):
        p.parse_mistamover_control(data, receipt_ext="mstm-rcpt")


@pytest.mark.parametrize("name", [b"", b"a/b", b".hidden", b"..", b"a\0b", b"x" * 256])
def test_mistamover_data_file_names_must_be_plain_names(name: bytes) -> None:
    md5 = hashlib.md5(b"x").hexdigest().encode()
    data = (b"_start_stager_ctrl_data_\n" + name + b"\n1\n" + md5 + b"\n." + name +
            b".1.r\n_end_stager_ctrl_data_\n")
    with pytest.raises(ProtocolError):
        p.parse_mistamover_control(data, receipt_ext="r")


def test_mistamover_receipt_has_its_status_codes_and_thank_you_name() -> None:
    """lib/ReceiptFile.py: name, status (0-4), size or -1, md5 or empty, thank-you name."""
    r = p.MsmReceipt("data.nc", p.MsmCode.NO_SUCH_FILE, -1, "", ".data.nc.1.5.mstm-thanks")
    data = p.render_mistamover_receipt(r)
    assert data == (b"_start_stager_receipt_data_\ndata.nc\n4\n-1\n\n.data.nc.1.5.mstm-thanks\n"
                    b"_end_stager_receipt_data_\n")
    assert p.parse_mistamover_receipt(data) == r
    assert [int(p.MSM_CODES[s]) for s in Status] == [0, 1, 2, 4, 3, 3]
    with pytest.raises(ProtocolError):
        p.parse_mistamover_receipt(data.replace(b"\n4\n", b"\n5\n"))


def test_mistamover_thank_you_names_the_receipt() -> None:
    """lib/ThankyouFile.py: start magic, receipt name, end magic."""
    data = p.render_mistamover_thanks(".data.nc.1.5.mstm-rcpt")
    assert data == b"_start_stager_thankyou_\n.data.nc.1.5.mstm-rcpt\n_end_stager_thankyou_\n"
    assert p.parse_mistamover_thanks(data) == ".data.nc.1.5.mstm-rcpt"
    assert p.mistamover_thanks_name(".data.nc.1.5.mstm-rcpt", receipt_ext="mstm-rcpt",
                                    thanks_ext="mstm-thanks") == ".data.nc.1.5.mstm-thanks"


def test_empty_directories_travel_as_dir_lines_and_a_path_is_listed_once() -> None:
    c = protocol.Control(batch="20260101T000000000000-aaaaaaaaaaaa", algorithm="sha256",
                         receipt="20260101T000000000000-aaaaaaaaaaaa.mstm-rcpt",
                         items=(protocol.ControlItem("run1/a", 1, "0" * 64),),
                         dirs=("run1/empty", "run1/x y/\udcff"))
    raw = protocol.render_control(c)
    assert b"\ndir run1/empty\n" in raw and b"dir run1/x%20y/%FF\n" in raw
    assert protocol.parse_control(raw) == c
    twice = raw.replace(b"dir run1/empty\n", b"dir run1/a\n")
    with pytest.raises(protocol.ProtocolError, match="listed twice"):
        protocol.parse_control(twice)
    for bad in (b"dir ../x\n", b"dir /abs\n", b"dir a b\n", b"dir \n"):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_control(raw.replace(b"dir run1/empty\n", bad))
