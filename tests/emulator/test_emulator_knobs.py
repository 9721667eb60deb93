"""The emulator's knobs themselves: defaults, validation, admin route, CLI, and the bombs."""

from __future__ import annotations

import argparse
import io
import xml.parsers.expat
import zipfile
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.emulator import app as app_module
from daemon.emulator import bombs
from daemon.emulator.app import create_app
from daemon.emulator.cli import _settings, configure_parser
from daemon.emulator.hub import Faults, Hub, HubSettings, JobInfo, Knobs, Storage, Variants
from daemon.emulator.knobs import ALL_KNOBS, changes_from
from tests.scans import make_pdf

GIB = 1024**3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path / "store", HubSettings(processing_time=5.0, seed=1))


def run_job(hub: Hub, output_format: str = "docx") -> JobInfo:
    """Upload a PDF, convert it, and return the completed job."""
    info = hub.add_file("scan.pdf", make_pdf(2))
    body = {"file_id": info.file_id, "engine": "ki/ocr", "languages": ["jpn"]}
    job = hub.create_job({**body, "output_format": output_format})
    hub.clock.advance(6)
    return hub.get_job(job.job_id)


def output_path(hub: Hub, job: JobInfo) -> Path:
    assert job.output_file_id is not None
    return hub.open_download(job.output_file_id).path


# -- defaults and validation -----------------------------------------------------------------


def test_knob_defaults_are_the_behaviour_before_knobs() -> None:
    """Every knob has a default, the older fault knobs keep theirs, and names are unique."""
    defaults = Knobs().to_json()
    assert tuple(defaults) == ALL_KNOBS
    assert len(set(ALL_KNOBS)) == len(ALL_KNOBS)
    assert (Faults().error_rate, Faults().retry_after, Faults().files_rate_limit) == (0.0, 1.0, 0)
    assert (Variants().create_status, Variants().upload_status) == (202, 201)
    assert (Storage().download_mode, Storage().expired_status) == ("normal", 404)
    assert HubSettings().variants == Variants()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"nonsense": 1}, "'nonsense'"),
        ({"outage_mode": "boom"}, "outage_mode"),
        ({"omit_fields": ["usage", "progress"]}, "omit_fields"),
        ({"refuse_route": "GET /nowhere"}, "refuse_route"),
        ({"create_status": "202"}, "create_status"),
        ({"create_status": 204}, "create_status"),
        ({"extra_status": "completed"}, "extra_status"),
        ({"trickle_interval": 0}, "trickle_interval"),
        ({"output_ttl": 0}, "output_ttl"),
        ({"timestamp_skew": float("nan")}, "timestamp_skew"),
        ({"outage": -1}, "outage"),
        ({"missing_input_code": ""}, "missing_input_code"),
        ({"storage_host": "bad host/"}, "storage_host"),
        ({"echo_auth": 1}, "echo_auth"),
        ({"lose_create_replies": -1}, "lose_create_replies"),
    ],
)
def test_bad_knob_names_and_values_are_named(hub: Hub, changes: dict[str, Any], named: str) -> None:
    """A bad knob or value raises ValueError naming the knob, and changes nothing."""
    with pytest.raises(ValueError, match=named):
        hub.update_knobs({"latency": 0.5, **changes})
    assert hub.knobs == Knobs()


def test_updates_mix_groups_and_reset_restores_the_build(tmp_path: Path) -> None:
    """One update may touch every group; reset_knobs returns to the hub's build knobs."""
    built = HubSettings(variants=Variants(create_status=201))
    hub = Hub(tmp_path, built)
    knobs = hub.update_knobs(
        {"drop_rate": 0.5, "download_gzip": True, "omit_fields": ["usage"], "outage": 30}
    )
    assert (knobs.faults.drop_rate, knobs.storage.download_gzip) == (0.5, True)
    assert knobs.variants.omit_fields == ("usage",)
    assert knobs.to_json()["omit_fields"] == ["usage"]
    assert hub.update_faults({"latency": 1}) == hub.knobs.faults
    assert hub.reset_knobs() == Knobs(variants=Variants(create_status=201))


@pytest.mark.anyio
async def test_admin_route_reads_and_changes_every_knob(hub: Hub) -> None:
    """GET /_emulator/faults lists all knobs; POST changes any; 400 names a bad one."""
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as admin:
        listed = (await admin.get("/_emulator/faults")).json()
        changed = await admin.post(
            "/_emulator/faults", json={"wait_mode": "reject", "output_bomb": "zeros"}
        )
        refused = await admin.post("/_emulator/faults", json={"wait_mode": "sometimes"})
    assert listed == Knobs().to_json()
    assert changed.json() == {**listed, "wait_mode": "reject", "output_bomb": "zeros"}
    assert refused.status_code == 400
    assert "wait_mode" in refused.json()["message"]
    assert "'sometimes'" in refused.json()["message"]
    assert hub.knobs.variants.wait_mode == "reject"


# -- the command line ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser()
    configure_parser(made)
    return made


def test_cli_flags_set_knobs_of_every_group() -> None:
    """--knob-name options build the hub's knobs; unset ones keep their defaults."""
    args = parser().parse_args(
        [
            "--outage",
            "forever",
            "--outage-mode",
            "html502",
            "--omit-fields",
            "usage,expires_at",
            "--create-status",
            "201",
            "--refuse-route",
            "POST /renderocr/jobs",
            "--echo-auth",
            "--timestamp-skew",
            "-90",
            "--output-ttl",
            "5",
            "--download-mode",
            "trickle",
            "--error-rate",
            "0.1",
        ]
    )
    settings = _settings(args)
    assert (settings.faults.outage, settings.faults.outage_mode) == (True, "html502")
    assert settings.faults.refuse_route == "POST /renderocr/jobs"
    assert settings.faults.error_rate == 0.1
    assert settings.variants.omit_fields == ("usage", "expires_at")
    assert (settings.variants.create_status, settings.variants.echo_auth) == (201, True)
    assert settings.variants.timestamp_skew == -90
    assert (settings.storage.output_ttl, settings.storage.download_mode) == (5, "trickle")
    assert settings.storage.bomb_depth == Storage().bomb_depth
    assert Knobs().updated(changes_from(parser().parse_args([]))) == Knobs()
    assert _settings(parser().parse_args([])).faults == Faults()


@pytest.mark.parametrize(
    "argv",
    [
        ["--create-status", "204"],
        ["--omit-fields", "bogus"],
        ["--outage", "soon"],
        ["--trickle-interval", "0"],
        ["--timestamp-style", "local"],
        ["--list-limit", "-1"],
        ["--refuse-route", "DELETE /files"],
    ],
)
def test_cli_refuses_bad_knob_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value on the command line is a usage error."""
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_every_knob_is_documented_in_help_and_in_the_app_docstring() -> None:
    """--help has a --flag for each knob, and app.py's docstring names each one."""
    text = parser().format_help()
    doc = app_module.__doc__ or ""
    for name in ALL_KNOBS:
        assert "--" + name.replace("_", "-") in text, name
        assert name in doc, name


# -- bombs -----------------------------------------------------------------------------------


def test_crc32_combine_matches_zlib() -> None:
    """crc32_combine gives zlib's CRC of a concatenation from the parts' CRCs."""
    first, second = b"hot folder" * 1000, bytes(range(256)) * 77
    combined = bombs.crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert combined == zlib.crc32(first + second)
    assert bombs.crc32_combine(zlib.crc32(first), zlib.crc32(b""), 0) == zlib.crc32(first)


def test_runs_deflate_and_gzip_to_exactly_their_data() -> None:
    """Repeated deflate units form one valid stream, with the sizes and CRC declared."""
    runs = [bombs.Run(b"<head>"), bombs.Run(b"<n>", 700_001), bombs.Run(b"\0", 3_000_000)]
    data = b"".join(run.pattern * run.count for run in runs)
    deflated = b"".join(bombs.deflate_chunks(runs))
    gzipped = b"".join(bombs.gzip_chunks(runs))
    assert len(deflated) == bombs.deflate_size(runs) < len(data) // 200
    assert zlib.decompress(deflated, -15) == data
    assert len(gzipped) == bombs.gzip_size(runs)
    assert zlib.decompress(gzipped, 31) == data
    assert bombs.runs_crc(runs) == zlib.crc32(data)


def test_zeros_output_bomb_declares_gibibytes_in_a_small_package(hub: Hub) -> None:
    """output_bomb zeros: a few MB on disk whose ZIP64 member declares 4 GiB of zeros."""
    hub.update_knobs({"output_bomb": "zeros"})
    path = output_path(hub, run_job(hub))
    with zipfile.ZipFile(path) as package:
        member = package.getinfo(bombs.BOMB_PART)
        with package.open(member) as stream:
            start = stream.read(8 * 1024 * 1024)
        document = package.read("word/document.xml")
        types = package.read("[Content_Types].xml")
    assert path.stat().st_size < 5 * 1024 * 1024
    assert member.file_size == 4 * GIB
    assert member.compress_size < 5 * 1024 * 1024
    assert start == bytes(len(start))
    assert b"Page 2 of 2" in document
    assert b'Extension="bin"' in types


@pytest.mark.parametrize("output_format", ["docx", "xlsx", "pptx"])
def test_deep_xml_output_bomb_nests_its_main_part(hub: Hub, output_format: str) -> None:
    """output_bomb deep_xml: the main part nests bomb_depth elements, and stays well-formed."""
    hub.update_knobs({"output_bomb": "deep_xml", "bomb_depth": 20_000})
    path = output_path(hub, run_job(hub, output_format))
    main = bombs.MAIN_PARTS[output_format]
    with zipfile.ZipFile(path) as package:
        assert package.testzip() is None
        text = package.read(main)
    depth, deepest = 0, 0

    def opened(name: str, attributes: dict[str, str]) -> None:
        nonlocal depth, deepest
        depth += 1
        deepest = max(deepest, depth)

    def closed(name: str) -> None:
        nonlocal depth
        depth -= 1

    parser = xml.parsers.expat.ParserCreate()
    parser.StartElementHandler = opened
    parser.EndElementHandler = closed
    parser.Parse(text, True)
    assert deepest > 20_000


def test_default_deep_xml_bomb_is_ten_million_deep_and_small(hub: Hub) -> None:
    """The default deep_xml bomb declares ~70 MB of nesting in well under 100 KB."""
    hub.update_knobs({"output_bomb": "deep_xml"})
    path = output_path(hub, run_job(hub))
    with zipfile.ZipFile(path) as package:
        member = package.getinfo("word/document.xml")
        with package.open(member) as stream:
            head = stream.read(4096)
    assert path.stat().st_size < 100_000
    assert member.file_size > 7 * 10_000_000
    assert b"<w:document " in head
    assert b'relationships"><n><n><n>' in head  # the chain starts right inside the root
    assert head.count(b"<n>") > 1000


def test_output_bomb_applies_to_jobs_completing_after_it_is_set(hub: Hub) -> None:
    """A bomb knob set while a job runs shapes that job's output; unset, outputs are normal."""
    info = hub.add_file("scan.pdf", make_pdf())
    body = {"file_id": info.file_id, "engine": "ki/ocr", "languages": ["jpn"]}
    job = hub.create_job({**body, "output_format": "docx"})
    hub.update_knobs({"output_bomb": "zeros", "bomb_bytes": 10_000_000})
    hub.clock.advance(6)
    bombed = output_path(hub, hub.get_job(job.job_id))
    hub.update_knobs({"output_bomb": "none"})
    plain = output_path(hub, run_job(hub))
    assert bombs.BOMB_PART in zipfile.ZipFile(bombed).namelist()
    assert bombs.BOMB_PART not in zipfile.ZipFile(io.BytesIO(plain.read_bytes())).namelist()
