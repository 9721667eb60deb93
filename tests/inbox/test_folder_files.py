"""Folder rules files are read like inputs: no links, regular, small, never blocking (#35).

Real links (to ``/dev/zero``), real FIFOs and real large files; each is refused with a
reason at once, unread.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from daemon.errors import FolderFileError
from daemon.inbox.routing import FOLDER_FILE, FOLDER_FILE_MAX, Router, read_folder_file
from tests.inbox.inprocess import DEFAULTS

RULES = f"sub/{FOLDER_FILE}"


def refusal(inbox: Path) -> str:
    """The reason reading ``sub/.ldx-hotfolder.toml`` is refused, within 5 seconds."""
    found: list[BaseException | object] = []

    def read() -> None:
        try:
            found.append(read_folder_file(inbox, RULES))
        except BaseException as exc:  # handed to the test thread
            found.append(exc)

    reader = threading.Thread(target=read, daemon=True)  # a FIFO must not hang the suite
    reader.start()
    reader.join(5)
    assert found, "reading the folder file blocked"
    assert isinstance(found[0], FolderFileError), found[0]
    return found[0].message


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """An inbox with the folder ``sub``."""
    (tmp_path / "inbox" / "sub").mkdir(parents=True)
    return tmp_path / "inbox"


def test_a_link_to_dev_zero_is_refused_unread(inbox: Path) -> None:
    """``ln -s /dev/zero sub/.ldx-hotfolder.toml`` is refused without reading a byte."""
    (inbox / RULES).symlink_to("/dev/zero")
    assert "is a symbolic link" in refusal(inbox)


def test_a_fifo_never_blocks(inbox: Path) -> None:
    """A FIFO named like a folder file is refused at once, nobody writing to it."""
    os.mkfifo(inbox / RULES)
    assert "is not a regular file" in refusal(inbox)


def test_a_huge_file_is_refused_by_its_size(inbox: Path) -> None:
    """A folder file over 64 KiB is refused (the cap), a valid one under it read."""
    (inbox / RULES).write_bytes(b"# padding\n" * (FOLDER_FILE_MAX // 10 + 1))
    assert "larger than 64 KiB" in refusal(inbox)
    (inbox / RULES).write_text('language = "eng"\n' + "#" * 1000 + "\n", encoding="utf-8")
    fields = read_folder_file(inbox, RULES)
    assert fields is not None
    assert fields.language == "eng"


def test_non_utf8_is_refused(inbox: Path) -> None:
    """A folder file that is not UTF-8 is refused with a reason."""
    (inbox / RULES).write_bytes('language = "\xe9ng"\n'.encode("latin-1"))
    assert "is not UTF-8 text" in refusal(inbox)


def test_a_folder_swapped_for_a_link_is_not_followed(inbox: Path, tmp_path: Path) -> None:
    """The folder on the way is walked without links: an outside folder file is not read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / FOLDER_FILE).write_text('language = "eng"\n', encoding="utf-8")
    (inbox / "sub").rmdir()
    (inbox / "sub").symlink_to(outside)
    assert "cannot be read safely" in refusal(inbox)


def test_the_router_fails_the_files_below_a_refused_folder_file(inbox: Path) -> None:
    """Every file of the folder gets the refusal as its problem; other folders route fine."""
    os.mkfifo(inbox / RULES)
    router = Router(inbox, [], DEFAULTS)
    for name in ("sub/a.pdf", "sub/deeper/b.pdf"):
        chosen, problem = router.route(name)
        assert problem is not None
        assert "is not a regular file" in problem
        assert chosen.language == "jpn"  # the defaults, never the refused file's
    assert router.route("other/c.pdf")[1] is None
