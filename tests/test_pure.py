"""Unit tests of the pure decision modules: layout, filters, backoff, stability, formats."""

from __future__ import annotations

import fnmatch
import hashlib
import random

from hypothesis import given
from hypothesis import strategies as st

from daemon.formats import InputFormat, describe, sniff
from daemon.inbox.filters import NameFilter
from daemon.inbox.stability import Patience, Signature, Verdict, observe, verdict
from daemon.outbox.layout import error_file_for, fit_name, output_candidates, temp_name, upload_name
from daemon.pipeline.faults import retry_delay
from tests.helpers import input_name
from tests.scans import FORMATS, make_scan


def first(rel: str, fmt: str = "docx", n: int = 4) -> list[str]:
    gen = output_candidates(rel, fmt)
    return [next(gen) for _ in range(n)]


def test_output_mirrors_input_path() -> None:
    """The first candidate keeps the folders and swaps the extension."""
    assert first("a/b/scan.pdf")[0] == "a/b/scan.docx"
    assert first("scan.PNG", "xlsx")[0] == "scan.xlsx"


def test_output_candidates_separate_same_stem() -> None:
    """Later candidates keep the input's extension, then number it."""
    assert first("a/scan.png") == [
        "a/scan.docx",
        "a/scan.png.docx",
        "a/scan.png (2).docx",
        "a/scan.png (3).docx",
    ]


def test_error_file_sits_beside_output() -> None:
    """The error file keeps the input name and adds .error.txt."""
    assert error_file_for("a/b/scan.pdf") == "a/b/scan.pdf.error.txt"


@given(st.text(min_size=1, max_size=300).filter(lambda s: "/" not in s and "\x00" not in s))
def test_names_fit_255_bytes(stem: str) -> None:
    """Every generated name fits a filesystem's 255-byte limit."""
    for candidate in first(f"dir/{stem}.pdf"):
        name = candidate.rsplit("/", 1)[-1]
        assert len(name.encode("utf-8", "surrogateescape")) <= 255
        assert candidate.startswith("dir/")
    assert len(fit_name(stem, ".docx").encode("utf-8", "surrogateescape")) <= 255


def test_temp_name_is_hidden_and_ignored() -> None:
    """Temporary outputs are dotfiles, so intake would ignore them too."""
    name = temp_name("scan.docx", 7)
    assert name.startswith(".")
    assert NameFilter().match(name) is not None


def test_filter_defaults_cover_junk() -> None:
    """OS and NAS junk and partial downloads are ignored by default."""
    nf = NameFilter()
    for junk in (
        ".DS_Store",
        "._scan.pdf",
        "Thumbs.db",
        "desktop.ini",
        "@eaDir",
        "#recycle",
        "__MACOSX",
        "scan.pdf.part",
        "x.tmp",
        "~$doc.pdf",
        "scan.pd~",
        "a.crdownload",
    ):
        assert nf.match(junk) is not None, junk
    for good in ("scan.pdf", "Scan 2026.PDF", "請求書.png"):
        assert nf.match(good) is None, good


def test_filter_checks_every_path_component() -> None:
    """A file under an ignored folder is ignored, and the folder is named."""
    nf = NameFilter.with_extra(["*.bak"])
    assert nf.ignored_part("@eaDir/scan.pdf") == ("@eaDir", "@eaDir")
    assert nf.ignored_part("a/b/old.BAK") == ("old.BAK", "*.bak")
    assert nf.ignored_part("a/b/scan.pdf") is None


_GLOB = st.text(alphabet="ab.*?[]!~$#Ä", max_size=6)


@given(st.lists(_GLOB, max_size=4), st.text(alphabet="abAB.~$#äÄ", max_size=8))
def test_filter_names_the_first_matching_pattern(extra: list[str], name: str) -> None:
    """The filter names the first pattern that matches, case-folded, as fnmatch does."""
    nf = NameFilter.with_extra(extra)
    folded = name.casefold()
    expected = next((p for p in nf.patterns if fnmatch.fnmatchcase(folded, p.casefold())), None)
    assert nf.match(name) == expected


def test_backoff_grows_and_is_capped() -> None:
    """Delays stay under base*2^(n-1) and under the cap."""
    rng = random.Random(1)
    for attempt in range(1, 30):
        delay = retry_delay(attempt, rng=rng, base=1.0, cap=60.0)
        assert 0 <= delay <= min(60.0, 2 ** (attempt - 1))


def test_backoff_honours_retry_after_as_floor() -> None:
    """Retry-After is never undercut, whatever the jitter draws."""
    rng = random.Random(2)
    assert all(retry_delay(1, retry_after=7.0, rng=rng) >= 7.0 for _ in range(100))


def test_backoff_caps_an_absurd_retry_after_at_an_hour() -> None:
    """A Retry-After of days or infinity waits an hour at most; an hour itself is honoured."""
    rng = random.Random(3)
    assert retry_delay(1, retry_after=3600.0, rng=rng) == 3600.0
    assert retry_delay(1, retry_after=86400.0 * 30, rng=rng) == 3600.0
    assert retry_delay(1, retry_after=float("inf"), rng=rng) == 3600.0


def test_backoff_is_jittered() -> None:
    """Retries of the same attempt are spread out, not synchronised."""
    rng = random.Random(3)
    delays = {round(retry_delay(5, rng=rng), 6) for _ in range(50)}
    assert len(delays) > 40


QUIET = Patience(quiet_period=2.0, stalled_after=1e12, incomplete_timeout=1e12)


def test_stability_needs_quiet_period() -> None:
    """A file is stable only after its signature stays the same for the quiet period."""
    sig = Signature(size=10, mtime_ns=1, inode=5)
    seen = observe(None, sig, now=100.0)
    assert verdict(seen, 101.0, QUIET) is Verdict.WAIT
    seen = observe(seen, sig, now=102.5)
    assert verdict(seen, 102.5, QUIET) is Verdict.CHECK


def test_stability_restarts_on_change() -> None:
    """Any change of size, mtime or inode restarts the quiet period."""
    seen = observe(None, Signature(10, 1, 5), now=100.0)
    for changed in (Signature(11, 1, 5), Signature(10, 2, 5), Signature(10, 1, 6)):
        later = observe(seen, changed, now=105.0)
        assert later.since == 105.0
        assert verdict(later, 106.0, QUIET) is Verdict.WAIT


def test_empty_file_never_stable() -> None:
    """A zero-byte placeholder is waited for, not taken."""
    seen = observe(None, Signature(0, 1, 5), now=0.0)
    assert verdict(seen, 1e9, QUIET) is Verdict.WAIT


def test_sniff_recognises_every_format() -> None:
    """Each accepted format is recognised from content alone."""
    for fmt in FORMATS:
        assert sniff(make_scan(fmt)) == InputFormat(fmt)


def test_describe_names_other_content() -> None:
    """Refusals say what a file looks like."""
    assert describe(b"PK\x03\x04rest") == "a ZIP archive or Office document"
    assert describe(b"hello world") == "a text file"
    assert describe(b"") == "an empty file"
    assert sniff(b"PK\x03\x04") is None


@given(
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=300
    ).filter(lambda s: "/" not in s and "." not in s),
    st.sampled_from(["", ".pdf", ".tiff", ".JPG"]),
)
def test_upload_names_carry_the_content_tag_and_the_extension_and_fit(stem: str, ext: str) -> None:
    """Upload names: the input's, tagged with 16 hex of its hash, extension last, in 255 bytes."""
    digest = hashlib.sha256(stem.encode("utf-8", "surrogatepass")).hexdigest()
    name = upload_name(f"folder/{stem}{ext}", digest)
    assert name.endswith(f".ldx-{digest[:16]}{ext}")
    assert len(name.encode("utf-8", "surrogateescape")) <= 255
    if len(f"{stem}{ext}".encode()) < 200:
        assert input_name(name) == f"{stem}{ext}"
