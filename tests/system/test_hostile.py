"""A hostile inbox: links, special files, odd names and junk never lead the daemon astray."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import cli, wait_for
from tests.inbox.test_intake_pure import JUNK
from tests.intake_support import done, outputs, rows, running, uploads
from tests.scans import make_pdf, make_scan

MARKER = b"TOP-SECRET-MARKER-7f3a"
CONTROL = b"PLAIN-CONTROL-MARKER-91c2"  # in a normal input: shows the marker check can fail
JUNK_FOLDERS = {"@eaDir", "#recycle", ".Trashes", "__MACOSX", ".@__thumb", ".stfolder"}


def emulator_holds(emulator: EmulatorServer, needle: bytes) -> bool:
    """Whether any file the hub stored (uploads and outputs) contains ``needle``."""
    return any(
        needle in path.read_bytes() for path in emulator.hub.data_dir.rglob("*") if path.is_file()
    )


def plant_hostile(inbox: Path, outside: Path) -> dict[str, str]:
    """Links, special files and refused hard links in the inbox; their expected states."""
    secret = outside / "secret.pdf"
    secret.write_bytes(make_pdf(1, marker=MARKER.decode()))
    (outside / "folder").mkdir()
    (outside / "folder" / "inner.pdf").write_bytes(make_pdf(1, marker=MARKER.decode()))
    (inbox / "link.pdf").symlink_to(secret)
    (inbox / "linked folder").symlink_to(outside / "folder")
    (inbox / "dangling.pdf").symlink_to(outside / "nowhere.pdf")
    os.link(secret, inbox / "hard.pdf")
    os.mkfifo(inbox / "scan.pdf")
    os.mknod(inbox / "device.pdf", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    with socket.socket(socket.AF_UNIX) as sock:
        cwd = Path.cwd()
        os.chdir(inbox)  # socket paths are limited to 108 bytes; bind a short relative one
        try:
            sock.bind("socket.pdf")
        finally:
            os.chdir(cwd)
    return {
        "link.pdf": "not_followed",
        "linked folder/inner.pdf": "not_followed",
        "dangling.pdf": "not_followed",
        "hard.pdf": "failed",
        "scan.pdf": "not_a_file",
        "device.pdf": "not_a_file",
        "socket.pdf": "not_a_file",
    }


def odd_names(inbox: Path) -> dict[bytes, bytes]:
    """Legal but odd names (raw bytes) and the scans written under them."""
    names = {
        b"bad\xff\xfename.pdf": make_scan("pdf", 21),
        b"line\nbreak\tand\x1b[31mescape.png": make_scan("png", 22),
        "\u202egnp.exe.png".encode(): make_scan("png", 23),
        b"L" * 251 + b".jpg": make_scan("jpeg", 24),
        b"100% sure.bmp": make_scan("bmp", 25),
    }
    for raw, data in names.items():
        with open(os.path.join(os.fsencode(inbox), raw), "wb") as out:
            out.write(data)
    return names


@pytest.mark.skipif(os.geteuid() != 0, reason="device files need root (CI runs as root)")
@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_hostile_inbox(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, use_polling: bool
) -> None:
    """Links and special files are not read; odd names get safe outputs; junk is never uploaded."""
    # Throughout, the daemon keeps running, and explain reports every case.
    inbox, outside = folders["inbox"], tmp_path / "outside"
    outside.mkdir()
    before_outside = sorted(p.name for p in tmp_path.iterdir())
    config = daemon_config(
        tmp_path,
        folders,
        emulator.url,
        rescan_interval=3600.0,  # the watcher alone (inotify or polling) must find the files
        use_polling=use_polling,
        polling_interval=0.5,
    )
    db = folders["state"] / "state.db"
    with running(config, tmp_path / "daemon.log") as daemon:
        expected = plant_hostile(inbox, outside)
        names = odd_names(inbox)
        for seed, junk in enumerate(JUNK, start=100):
            target = inbox / "junk" / junk
            target.parent.mkdir(exist_ok=True)
            if junk in JUNK_FOLDERS:  # put a scan inside
                target.mkdir()
                target = target / "scan.pdf"
            target.write_bytes(make_scan("pdf", seed))  # distinct: no duplicate reuse hides one
        (inbox / "fine.tif").write_bytes(make_scan("tiff", 31))
        wait_for(lambda: len(done(db)) == len(names) + 1, 60, "the good files to convert")
        wait_for(lambda: any(r["path"] == "hard.pdf" for r in rows(db)), 30, "hard.pdf refused")
        # still alive and watching
        (inbox / "later.pdf").write_bytes(make_pdf(1, marker=CONTROL.decode()))
        wait_for(lambda: "later.pdf" in done(db), 30, "a file dropped afterwards to convert")
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
    assert not emulator_holds(emulator, MARKER)
    assert emulator_holds(emulator, CONTROL)
    assert not [r["path"] for r in rows(db) if r["path"].startswith("junk/")]
    sent = uploads(emulator)
    assert not set(sent) & {"link.pdf", "hard.pdf", "scan.pdf", "device.pdf", "socket.pdf"}
    assert not any(name in sent for name in JUNK)
    assert sum(sent.values()) == len(names) + 2
    # outputs: safe, printable names that fit; nothing written anywhere else
    made = outputs(folders["outbox"])
    assert "bad%FF%FEname.docx" in made
    assert "line%0Abreak%09and%1B[31mescape.docx" in made
    assert "%E2%80%AEgnp.exe.docx" in made
    assert "100% sure.docx" in made
    assert all(name.isprintable() and len(name.encode()) <= 255 for name in made)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "daemon.log") == sorted(
        [*before_outside, "config.toml", "api-key"]
    )
    assert sorted(p.name for p in outside.iterdir()) == ["folder", "secret.pdf"]
    hard = next(r for r in rows(db) if r["path"] == "hard.pdf")
    assert hard["error_code"] == "hard_link"
    assert "allow_hardlinks" in hard["error_message"]
    assert (folders["outbox"] / "hard.pdf.error.txt").exists()
    explained = cli(config, "explain", "--json", *(str(inbox / rel) for rel in expected))
    assert explained.returncode == 0, explained.stderr
    states = {item["path"]: item["state"] for item in json.loads(explained.stdout)}
    assert states == expected
    odd = cli(
        config, "explain", os.fsdecode(os.path.join(os.fsencode(inbox), b"bad\xff\xfename.pdf"))
    )
    assert "[completed]" in odd.stdout
    assert "bad%FF%FEname.docx" in odd.stdout


def test_hard_links_are_accepted_when_allowed(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """With allow_hardlinks = true a file with two links converts like any other."""
    original = tmp_path / "original.png"
    original.write_bytes(make_scan("png", 40))
    os.link(original, folders["inbox"] / "linked.png")
    config = daemon_config(tmp_path, folders, emulator.url, allow_hardlinks=True)
    result = cli(config, "once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert uploads(emulator) == {"linked.png": 1}
