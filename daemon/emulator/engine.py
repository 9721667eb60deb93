"""The one RenderOCR engine the hub offers, and how a job request is checked against it.

``engines()`` is the body of ``GET /renderocr/engines``; ``parse_job_request`` refuses a
``POST /renderocr/jobs`` body that names an engine, language or output format the engine
does not offer (``InvalidRequest``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.emulator.documents import OUTPUT_FORMATS
from daemon.emulator.refusals import InvalidRequest
from daemon.formats import InputFormat

ENGINE_ID = "ki/ocr"
INPUT_FORMATS = tuple(fmt.value for fmt in InputFormat)
# Only "Auto" and "jpn" are known; the rest are ISO 639-2/T codes in the same style.
LANGUAGES = (
    ("Auto", "Auto-detect"),
    ("jpn", "Japanese"),
    ("eng", "English"),
    ("zho", "Chinese"),
    ("kor", "Korean"),
    ("deu", "German"),
    ("fra", "French"),
    ("spa", "Spanish"),
)


@dataclass(frozen=True)
class JobRequest:
    """A job-creation body that passed the checks."""

    file_id: str
    engine: str
    languages: tuple[str, ...]
    output_format: str


def engines() -> list[dict[str, Any]]:
    """The body of ``GET /renderocr/engines`` under ``data``."""
    conversions = [{"from": f, "to": t} for f in INPUT_FORMATS for t in OUTPUT_FORMATS]
    languages = [{"code": code, "display_name": name} for code, name in LANGUAGES]
    return [
        {
            "id": ENGINE_ID,
            "display_name": "KI OCR",
            "provider": "ki",
            "description": (
                "OCR for scanned PDFs and images: produces editable Word, Excel or "
                "PowerPoint documents that keep the page layout."
            ),
            "supported_conversions": conversions,
            "supported_languages": languages,
        }
    ]


def parse_job_request(body: object) -> JobRequest:
    """Check a job-creation body against the engine list; InvalidRequest if it fails.

    The real validation codes are unknown; these are the backend's {code, message} style.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "The request body must be a JSON object.")
    for name in ("file_id", "engine", "output_format"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidRequest("invalid_request", f"'{name}' is required and must be a string.")
    languages = body.get("languages")
    # Required, like the n8n node treats it; only the first entry is used, all must exist.
    if (
        not isinstance(languages, list)
        or not languages
        or not all(isinstance(code, str) for code in languages)
    ):
        message = "'languages' must be a non-empty array of language codes."
        raise InvalidRequest("invalid_request", message)
    request = JobRequest(body["file_id"], body["engine"], tuple(languages), body["output_format"])
    if request.engine != ENGINE_ID:
        message = f"Unknown engine {request.engine!r}; see GET /renderocr/engines."
        raise InvalidRequest("invalid_engine", message)
    offered = {code for code, _ in LANGUAGES}
    for code in request.languages:
        if code not in offered:
            message = f"Engine {ENGINE_ID!r} does not offer language {code!r}."
            raise InvalidRequest("invalid_language", message)
    if request.output_format not in OUTPUT_FORMATS:
        message = (
            f"Engine {ENGINE_ID!r} cannot produce {request.output_format!r}; "
            f"choose one of {', '.join(OUTPUT_FORMATS)}."
        )
        raise InvalidRequest("invalid_output_format", message)
    return request
