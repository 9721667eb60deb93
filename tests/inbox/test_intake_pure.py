"""Unit tests of intake's pure decisions: names, stability, completeness, mounts, duplicates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.formats import InputFormat, Reader, completeness, looks_unwritten, sniff
from daemon.fs import fs_path, is_escaped, stored_path
from daemon.inbox.filters import NameFilter
from daemon.inbox.inputs import Inspection
from daemon.inbox.intake import MAX_UPLOAD_BYTES, refusal
from daemon.inbox.mounts import (
    Mount,
    attribute_cache_seconds,
    needs_polling,
    parse_mountinfo,
    parse_proc_mounts,
    remote_storage,
    stale_size_warnings,
    watch_plan,
)
from daemon.inbox.stability import (
    Patience,
    Signature,
    Verdict,
    observe,
    stall,
    verdict,
    with_problem,
)
from daemon.jobs.model import Waiting
from daemon.ops.explain import Facts, Rules, explain, locate
from daemon.outbox.duplicates import Action, decide
from daemon.outbox.layout import output_candidates
from tests.scans import FORMATS, make_scan

JUNK = (
    ".hidden.pdf",
    "scan.pdf.tmp",
    "scan.pdf.part",
    "scan.pdf.crdownload",
    "~$scan.pdf",
    "scan.pd~",
    ".DS_Store",
    "._scan.pdf",
    "Thumbs.db",
    "desktop.ini",
    "@eaDir",
    "#recycle",
    ".Trashes",
    "__MACOSX",
    ".@__thumb",
    ".stfolder",
)


def reader(data: bytes) -> Reader:
    """A completeness reader over bytes."""
    return lambda offset, length: data[offset : offset + length]


# -- names ------------------------------------------------------------------------------


def test_plain_names_are_stored_as_they_are() -> None:
    """Ordinary names, Unicode included, and a lone percent sign are not escaped."""
    for name in ("scan.pdf", "a/b/請求書 1.png", "100% done.pdf", "émile-ß.tif"):
        assert stored_path(name) == name
        assert fs_path(name) == name
        assert not is_escaped(name)


def test_odd_names_are_escaped_printably() -> None:
    """Undecodable bytes, control and bidi characters become %XX; so does % before hex."""
    raw = os.fsdecode(b"bad\xffname\n\x1b[31m" + "\u202e".encode() + b"gpj.pdf")
    stored = stored_path(raw)
    assert stored == "bad%FFname%0A%1B[31m%E2%80%AEgpj.pdf"
    assert stored.isprintable()
    assert stored_path("50%41.pdf") == "50%2541.pdf"


@given(st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"/" not in b), max_size=3))
def test_escaping_is_reversible(parts: list[bytes]) -> None:
    """Every byte path round-trips, and its stored form is valid UTF-8."""
    raw = os.fsdecode(b"/".join(p.replace(b"\x00", b"_") for p in parts))
    stored = stored_path(raw)
    stored.encode("utf-8")  # never a lone surrogate
    assert fs_path(stored) == raw


def test_output_names_of_odd_inputs_are_safe() -> None:
    """An output derived from the stored form has no control character and fits 255 bytes."""
    raw = os.fsdecode(b"dir/\x07" + b"\xfe" * 300 + b".pdf")
    output = next(output_candidates(stored_path(raw), "docx"))
    name = output.rsplit("/", 1)[-1]
    assert output.startswith("dir/")
    assert name.isprintable()
    assert len(name.encode("utf-8")) <= 255


# -- stability ------------------------------------------------------------------------------

PATIENCE = Patience(quiet_period=2.0, stalled_after=60.0, incomplete_timeout=600.0)


def test_quiet_file_is_checked_after_the_quiet_period() -> None:
    """A file is taken only once it has been unchanged for the quiet period."""
    seen = observe(None, Signature(10, 1, 5), now=100.0)
    assert verdict(seen, 101.9, PATIENCE) is Verdict.WAIT
    assert verdict(seen, 102.0, PATIENCE) is Verdict.CHECK


def test_growing_file_is_waited_for_without_a_cliff() -> None:
    """A file that changes every second is never taken, however long it grows."""
    seen = observe(None, Signature(1, 1, 5), now=0.0)
    for second in range(1, 10_000, 1):
        seen = observe(seen, Signature(second + 1, second, 5), now=float(second))
        assert verdict(seen, second + 0.5, PATIENCE) is Verdict.WAIT
    assert seen.waiting_since == 0.0


def test_empty_file_waits_and_shows_as_stalled() -> None:
    """A zero-byte placeholder waits; after stalled_after it is reported stalled."""
    seen = observe(None, Signature(0, 1, 5), now=0.0)
    assert verdict(seen, 1e6, PATIENCE) is Verdict.WAIT
    assert stall(seen, 59.0, PATIENCE) is None
    stalled = stall(seen, 60.0, PATIENCE)
    assert stalled is not None
    assert stalled[0] == "empty_file"


def test_incomplete_file_waits_then_gives_up() -> None:
    """An incomplete file waits until unchanged for incomplete_timeout, then gives up."""
    seen = with_problem(observe(None, Signature(9, 1, 5), now=0.0), "incomplete PDF")
    assert verdict(seen, 10.0, PATIENCE) is Verdict.WAIT
    assert stall(seen, 61.0, PATIENCE) == ("incomplete", "incomplete PDF")
    assert verdict(seen, 600.0, PATIENCE) is Verdict.GIVE_UP
    changed = observe(seen, Signature(12, 2, 5), now=700.0)
    assert changed.problem is None
    assert verdict(changed, 702.0, PATIENCE) is Verdict.CHECK


def test_unreadable_file_waits_and_stalls_with_its_own_code() -> None:
    """A file the daemon may not read waits like an incomplete one, but stalls as unreadable."""
    seen = with_problem(observe(None, Signature(9, 1, 5), now=0.0), "no access", "unreadable")
    assert verdict(seen, 10.0, PATIENCE) is Verdict.WAIT
    assert stall(seen, 61.0, PATIENCE) == ("unreadable", "no access")
    assert verdict(seen, 600.0, PATIENCE) is Verdict.GIVE_UP
    readable = with_problem(seen, None)
    assert verdict(readable, 61.0, PATIENCE) is Verdict.CHECK
    assert stall(readable, 61.0, PATIENCE) is None


def test_once_gives_up_after_the_quiet_period() -> None:
    """An impatient run fails empty and incomplete files once they are quiet."""
    impatient = Patience(quiet_period=2.0, impatient=True)
    empty = observe(None, Signature(0, 1, 5), now=0.0)
    assert verdict(empty, 2.0, impatient) is Verdict.GIVE_UP
    half = with_problem(observe(None, Signature(5, 1, 5), now=0.0), "cut short")
    assert verdict(half, 2.0, impatient) is Verdict.GIVE_UP


# -- completeness ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_complete_files_pass_and_cut_files_do_not(fmt: str) -> None:
    """Every format's complete file passes; the same file cut short is incomplete."""
    data = make_scan(fmt, seed=7, pages=3 if fmt == "tiff" else 1)
    kind = sniff(data)
    assert kind is InputFormat(fmt)
    assert completeness(kind, len(data), reader(data)) is None
    for cut in (len(data) // 3, len(data) - 10):
        part = data[:cut]
        problem = completeness(kind, len(part), reader(part))
        assert problem is not None
        assert problem.startswith(f"incomplete {kind.value.upper()}")


def test_preallocated_files_are_not_written_yet() -> None:
    """A file of zeros (space reserved, content not written) is recognised as unwritten."""
    assert looks_unwritten(b"\x00" * 64)
    assert not looks_unwritten(b"\x00\x00\x00\x18ftypheic")
    pdf = make_scan("pdf")
    zeros = pdf[:40] + b"\x00" * (len(pdf) - 40)
    assert completeness(InputFormat.PDF, len(zeros), reader(zeros)) is not None


def test_tiff_with_hostile_tables_is_checked_cheaply() -> None:
    """A TIFF whose strip table claims billions of entries is refused without reading it."""
    header = b"II*\x00" + (8).to_bytes(4, "little")
    entry = (273).to_bytes(2, "little") + (4).to_bytes(2, "little") + (2**31).to_bytes(4, "little")
    ifd = (1).to_bytes(2, "little") + entry + (10_000).to_bytes(4, "little") + b"\x00" * 4
    data = header + ifd
    problem = completeness(InputFormat.TIFF, len(data), reader(data))
    assert problem is not None
    assert "past the end" in problem


def test_refusal_reasons() -> None:
    """Hard links, empty, incomplete and unsupported files fail with their reason."""
    sig = Signature(10, 1, 2)
    pdf = Inspection(sig, 1, InputFormat.PDF, "a PDF file")
    assert refusal(pdf, "a.pdf", allow_hardlinks=False) is None
    linked = Inspection(sig, 2, InputFormat.PDF, "a PDF file")
    code, message = refusal(linked, "a.pdf", allow_hardlinks=False) or ("", "")
    assert code == "hard_link"
    assert "allow_hardlinks" in message
    assert refusal(linked, "a.pdf", allow_hardlinks=True) is None
    docx = Inspection(sig, 1, None, "a ZIP archive or Office document")
    code, message = refusal(docx, "a.pdf", allow_hardlinks=False) or ("", "")
    assert code == "unsupported_type"
    assert message.startswith("unsupported type: looks like a ZIP archive")
    empty = Inspection(Signature(0, 1, 2), 1, None, "an empty file")
    assert (refusal(empty, "a.pdf", False) or ("",))[0] == "empty_file"


def test_files_over_the_upload_cap_are_refused() -> None:
    """A scan over 200 MB (10**6 bytes each) fails with too_large (size, cap, what to do)."""
    at_cap = Inspection(Signature(MAX_UPLOAD_BYTES, 1, 2), 1, InputFormat.PDF, "a PDF file")
    assert refusal(at_cap, "a.pdf", allow_hardlinks=False) is None
    over = Signature(MAX_UPLOAD_BYTES + 1, 1, 2)
    cut = Inspection(over, 1, InputFormat.TIFF, "a TIFF image", "incomplete TIFF")
    code, message = refusal(cut, "a.tif", allow_hardlinks=False) or ("", "")
    assert code == "too_large"
    assert MAX_UPLOAD_BYTES == 200 * 10**6  # the reference's "200 MB"
    assert message.startswith("the file is 200.0 MB, more than the hub takes in one upload")
    assert "(200 MB)" in message
    assert "split it" in message
    assert "lower resolution" in message
    zip_file = Inspection(over, 1, None, "a ZIP archive or Office document")
    assert (refusal(zip_file, "a.pdf", False) or ("",))[0] == "unsupported_type"


def test_every_junk_name_is_ignored() -> None:
    """Temporary, partial, OS and NAS names from the list are never inputs."""
    nf = NameFilter()
    for junk in JUNK:
        assert nf.match(junk) is not None, junk
        assert nf.ignored_part(f"dept/{junk}/scan.pdf") is not None, junk
    for good in ("scan.PDF", "scan.tif", "scan.TIFF", "scan.jpeg", "x.JPG", "s.bmp"):
        assert nf.match(good) is None, good


# -- mounts ---------------------------------------------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /srv/scans rw,relatime shared:5 - ext4 /dev/sdb1 rw
41 30 0:41 / /srv/scans/inbox/from\\040nas rw,relatime shared:7 - cifs //nas/scans rw,vers=3.0
42 30 0:42 / /srv/scans/inbox/remote rw,nosuid - fuse.sshfs me@host:/scans rw
43 30 0:43 / /srv/scans/inbox/local rw - tmpfs tmpfs rw
44 41 0:44 / /srv/scans/inbox/from\\040nas/deeper rw - nfs4 server:/x rw
50 22 0:50 / /mnt/share rw,relatime - nfs server:/export rw,vers=4.2
51 22 0:51 / /mnt/bound rw - fuse /tmp/back rw,user_id=0
bogus line without separator
"""


def test_mountinfo_is_parsed_with_escapes() -> None:
    """Mount points with escaped spaces and every field after the separator are read."""
    mounts = parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 8
    assert mounts[2] == Mount(
        "/srv/scans/inbox/from nas",
        "cifs",
        "//nas/scans",
        ("rw", "relatime", "rw", "vers=3.0"),
    )
    assert mounts[3].fstype == "fuse.sshfs"


def test_proc_mounts_is_parsed() -> None:
    """The /proc/mounts fallback gives the same mounts."""
    text = "server:/export /mnt/share nfs rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
    assert parse_proc_mounts(text) == [
        Mount("/mnt/share", "nfs", "server:/export", ("rw",)),
        Mount("/", "ext4", "/dev/sda1", ("rw",)),
    ]


def test_network_and_fuse_types_need_polling() -> None:
    """NFS, CIFS, FUSE and shared-folder filesystems are polled; local ones are not."""
    for fstype in ("nfs", "nfs4", "cifs", "smb3", "fuse", "fuse.sshfs", "fuse.rclone", "9p"):
        assert needs_polling(fstype), fstype
    for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs"):
        assert not needs_polling(fstype), fstype


def test_auto_polls_only_network_parts_of_a_local_inbox() -> None:
    """A local inbox is watched by inotify, its network sub-mounts polled."""
    inbox = Path("/srv/scans/inbox")
    plan = watch_plan(inbox, "auto", parse_mountinfo(MOUNTINFO))
    assert plan.inotify == (inbox,)
    assert plan.polled == (inbox / "from nas", inbox / "remote")
    assert any("cifs" in why for why in plan.reasons)


@pytest.mark.parametrize("inbox", ["/mnt/share/inbox", "/mnt/bound"])
def test_auto_polls_an_inbox_on_a_network_share(inbox: str) -> None:
    """An inbox on NFS or FUSE is polled as a whole; inotify is not used."""
    plan = watch_plan(Path(inbox), "auto", parse_mountinfo(MOUNTINFO))
    assert plan.inotify == ()
    assert plan.polled == (Path(inbox),)


def test_explicit_modes_ignore_the_mount_table() -> None:
    """use_polling true polls everything, false watches everything with inotify."""
    inbox, mounts = Path("/mnt/share"), parse_mountinfo(MOUNTINFO)
    assert watch_plan(inbox, True, mounts).polled == (inbox,)
    assert watch_plan(inbox, False, mounts).inotify == (inbox,)


def test_symlinked_inbox_is_planned_by_its_real_path() -> None:
    """The configured path may be a link; the plan follows where it really lives."""
    plan = watch_plan(Path("/data/inbox"), "auto", parse_mountinfo(MOUNTINFO), "/mnt/share/x")
    assert plan.polled == (Path("/data/inbox"),)


@pytest.mark.parametrize(
    ("options", "seconds"),
    [
        ((), 60.0),
        (("rw", "vers=4.2"), 60.0),
        (("rw", "actimeo=5"), 5.0),
        (("acregmax=20", "actimeo=5"), 20.0),
        (("rw", "noac"), 0.0),
    ],
)
def test_nfs_attribute_cache_follows_the_mount_options(
    options: tuple[str, ...], seconds: float
) -> None:
    """acregmax, then actimeo, then noac decide how stale NFS sizes may be; 60 s by default."""
    assert attribute_cache_seconds(Mount("/mnt/share", "nfs", "s:/x", options)) == seconds
    assert attribute_cache_seconds(Mount("/mnt/share", "cifs", "//s/x", options)) == 0.0


def test_a_quiet_period_shorter_than_the_nfs_cache_is_warned_about() -> None:
    """NFS holding or under the inbox, with a short quiet period, is warned about with the fix."""
    mounts = parse_mountinfo(MOUNTINFO)
    warnings = stale_size_warnings(Path("/mnt/share/inbox"), 10.0, mounts)
    assert len(warnings) == 1
    assert "/mnt/share is on nfs" in warnings[0]
    assert "quiet_period above 60 s" in warnings[0]
    assert stale_size_warnings(Path("/mnt/share/inbox"), 65.0, mounts) == []
    below = stale_size_warnings(Path("/srv/scans/inbox"), 2.0, mounts)
    assert [w.split(" is on ")[0] for w in below] == ["/srv/scans/inbox/from nas/deeper"]
    assert stale_size_warnings(Path("/srv/scans/inbox/local"), 2.0, mounts) == []


def test_network_storage_holding_or_below_a_folder_is_found() -> None:
    """A folder on a share, or with shares mounted below it, is on network storage."""
    mounts = parse_mountinfo(MOUNTINFO)
    assert remote_storage(["/mnt/share/outbox"], mounts) == ["/mnt/share"]
    assert remote_storage(["/srv/scans/inbox", "/srv/scans/outbox"], mounts) == [
        "/srv/scans/inbox/from nas",
        "/srv/scans/inbox/from nas/deeper",
        "/srv/scans/inbox/remote",
    ]
    assert remote_storage(["/srv/scans/inbox/local", "/var/lib/state"], mounts) == []


# -- duplicates ---------------------------------------------------------------------------


def test_duplicate_decisions() -> None:
    """convert always converts; reuse copies while the output is current; skip skips."""
    assert decide("convert", True, True) is Action.CONVERT
    assert decide("reuse", False, False) is Action.CONVERT
    assert decide("reuse", True, True) is Action.REUSE
    assert decide("reuse", True, False) is Action.CONVERT
    assert decide("skip", True, False) is Action.SKIP
    assert decide("skip", False, False) is Action.CONVERT


# -- explain ----------------------------------------------------------------------------------

RULES = Rules(Path("/in"), Path("/out"), 2.0, 300.0, 300.0, 3600.0, False, "reuse")


def test_locate_paths_relative_to_the_inbox() -> None:
    """Absolute and relative paths map into the inbox; paths outside it do not."""
    assert locate(Path("/in"), "/in/a/b.pdf", Path("/")) == "a/b.pdf"
    assert locate(Path("/in"), "a/b.pdf", Path("/elsewhere")) == "a/b.pdf"
    assert locate(Path("/in"), "b.pdf", Path("/in/a")) == "a/b.pdf"
    assert locate(Path("/in"), "/etc/passwd", Path("/")) is None
    assert locate(Path("/in"), "../x.pdf", Path("/elsewhere")) is None


def test_explain_a_file_not_taken_yet() -> None:
    """A fresh file: not in the table, changed N s ago, taken after the quiet period."""
    facts = Facts(
        "a.pdf",
        rel="a.pdf",
        kind="file",
        signature=Signature(10, 0, 1),
        mtime=99.0,
        inspection=Inspection(Signature(10, 0, 1), 1, InputFormat.PDF, "a PDF file"),
    )
    result = explain(facts, RULES, now=100.0)
    assert result.state == "waiting"
    assert "not in the state table yet" in result.lines[0]
    assert "last changed 1 s ago" in result.lines[1]
    assert "quiet period" in result.lines[1]


def test_explain_a_file_the_daemon_cannot_read() -> None:
    """The daemon's unreadable note makes the state unreadable, even when explain can read it."""
    note = Waiting("a.pdf", "unreadable", "a.pdf cannot be read by user ldx", 40.0, 50.0)
    facts = Facts(
        "a.pdf",
        rel="a.pdf",
        kind="file",
        signature=Signature(10, 0, 1),
        mtime=30.0,
        inspection=Inspection(Signature(10, 0, 1), 1, InputFormat.PDF, "a PDF file"),
        waiting=note,
    )
    result = explain(facts, RULES, now=100.0)
    assert result.state == "unreadable"
    assert "The daemon cannot read it: a.pdf cannot be read by user ldx" in result.lines[1]
    assert "stalled" in result.lines[-1]


def test_explain_ignored_and_special_files() -> None:
    """Ignored names name their rule; links and FIFOs are never read."""
    ignored = explain(Facts("x", rel="x.tmp", ignored=("x.tmp", "*.tmp")), RULES, 0.0)
    assert ignored.state == "ignored"
    assert "'*.tmp'" in ignored.lines[0]
    link = explain(Facts("l", rel="l.pdf", kind="a symbolic link", link_target="/etc"), RULES, 0)
    assert link.state == "not_followed"
    fifo = explain(Facts("f", rel="scan.pdf", kind="a FIFO (named pipe)"), RULES, 0.0)
    assert fifo.state == "not_a_file"
    assert "FIFO" in fifo.lines[0]
