"""The quick start's first command: ``ldx-hotfolder demo`` converts the sample scans."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon.demo import BROKEN, LAYOUT
from daemon.formats import sniff
from daemon.outbox.verify import verify_package


def test_demo_converts_every_format_in_nested_folders(tmp_path: Path) -> None:
    """demo exits 0 with a valid docx for a PDF, TIFF, JPEG, PNG and BMP in nested folders."""
    # It also writes an error file for the broken PDF and shows the job table and the outbox;
    # a -c it does not use gets a note, not a failure.
    root = tmp_path / "demo"
    unused = tmp_path / "no-such-config.toml"
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--keep", str(root), "-c", str(unused)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    inbox, outbox = root / "inbox", root / "outbox"
    good = [rel for rel in LAYOUT.values() if rel != BROKEN]
    kinds = {str(sniff((inbox / rel).read_bytes()[:64])) for rel in good}
    assert kinds == {"pdf", "tiff", "jpeg", "png", "bmp"}
    assert all("/" in rel for rel in good)  # every one in a subfolder
    for rel in good:
        output = rel.rsplit(".", 1)[0] + ".docx"
        verify_package(outbox / output, "docx")
        assert f"{rel}  -> {output}" in result.stdout
    assert "Reason:" in (outbox / f"{BROKEN}.error.txt").read_text(encoding="utf-8")
    assert (inbox / BROKEN).exists()
    assert "Job table" in result.stdout
    assert "Outbox (mirrors the inbox):" in result.stdout
    assert "5 converted, 1 failed, 0 unfinished." in result.stdout
    assert "Demo finished: all good scans converted." in result.stdout
    assert f"note: demo does not read {unused}: the demo runs on its own" in result.stderr


def test_the_demo_says_it_deletes_its_folder_and_how_to_keep_it() -> None:
    """Without --keep the demo says its folder goes away, and how to keep it."""
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tail = result.stdout.strip().splitlines()
    (said,) = [line for line in tail if "is deleted now" in line]
    folder = said.split("The demo folder ", 1)[1].split(" is deleted now", 1)[0]
    assert not Path(folder).exists()
    assert "ldx-hotfolder demo --keep DIR" in said
