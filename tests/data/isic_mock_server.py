"""A local stand-in for the ISIC Archive API v2, serving real images from ../shared/data.

`MockIsicArchive` runs a ThreadingHTTPServer on 127.0.0.1 (a free port) that serves:

- `GET /api/v2/images/search/?query=&collections=&limit=&cursor=`: cursor-paginated
  `{"count", "next", "previous", "results"}` with `page_size` results per page at most;
- `GET /api/v2/zip-download/license-file/<license>/`: the licence text (CC-0 only);
- `GET /files/<isic_id>.jpg`: the image bytes, listed as `files.full.url` and `files.full.size`.

Records are built from `isic-cc0-550/json/` (the per-image ISIC API v1 records, which
group the fields into `clinical` and `acquisition`) and `isic-cc0-550/metadata.csv`
(attribution and licence). The v1 records predate the ISIC diagnosis hierarchy, so
`diagnosis_1` is derived here from `benign_malignant` (benign -> Benign, malignant ->
Malignant); the legacy `diagnosis` and `benign_malignant` fields are kept.

The query parser accepts only `field:value` and `field:"value"` terms joined by AND, a
small subset of the ISIC search syntax. Any other query gets HTTP 400.

Faults can be injected per image id (or `SEARCH_TARGET` for the search endpoint): an HTTP
status for the next N requests, a connection dropped halfway through the body for the next
N requests, a stall longer than a client timeout, or a permanent 404.
"""

from __future__ import annotations

import base64
import csv
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import logging
from pathlib import Path
import re
import threading
import time
from types import TracebackType
from urllib.parse import parse_qs, urlencode, urlsplit

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
ISIC_CC0_DIR = SHARED_DATA_DIR / "isic-cc0-550"

SEARCH_TARGET = "search"
API_PREFIX = "/api/v2"
FILES_PREFIX = "/files/"
LICENSE_PREFIX = f"{API_PREFIX}/zip-download/license-file/"

_ACQUISITION_RENAMES = {"pixelsX": "pixels_x", "pixelsY": "pixels_y"}
_DIAGNOSIS_1 = {"benign": "Benign", "malignant": "Malignant"}
_TERM = re.compile(r'(?P<field>[A-Za-z0-9_]+):(?:"(?P<quoted>[^"]*)"|(?P<bare>[A-Za-z0-9_*.-]+))')


def shared_data_missing_reason(source_dir: Path = ISIC_CC0_DIR) -> str | None:
    """Return why the mock cannot run (for pytest.skip), or None when the data is present."""
    if not (source_dir / "metadata.csv").is_file() or not (source_dir / "json").is_dir():
        return (
            f"ISIC sample data not found at {source_dir} (expected metadata.csv and json/); "
            "the mock ISIC API serves those real images"
        )
    return None


@dataclass(frozen=True)
class MockImage:
    """One image the mock serves: its API record without `files`, and its source file."""

    isic_id: str
    path: Path
    record: dict

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def load_mock_images(source_dir: Path = ISIC_CC0_DIR, *, count: int | None = None) -> list[MockImage]:
    """Build ISIC API v2 records for the first `count` images (by id) of `source_dir`."""
    with (source_dir / "metadata.csv").open(newline="", encoding="utf8") as metadata_file:
        rows = sorted(csv.DictReader(metadata_file), key=lambda row: row["isic_id"])
    if count is not None:
        rows = rows[:count]
    return [_mock_image(source_dir, row) for row in rows]


def _mock_image(source_dir: Path, row: dict[str, str]) -> MockImage:
    isic_id = row["isic_id"]
    legacy = json.loads((source_dir / "json" / f"{isic_id}.json").read_text(encoding="utf8"))["meta"]

    clinical = {key: value for key, value in legacy.get("clinical", {}).items() if value is not None}
    if clinical.get("benign_malignant") in _DIAGNOSIS_1:
        clinical["diagnosis_1"] = _DIAGNOSIS_1[clinical["benign_malignant"]]
    acquisition = {
        _ACQUISITION_RENAMES.get(key, key): value
        for key, value in legacy.get("acquisition", {}).items()
        if value is not None
    }

    record = {
        "isic_id": isic_id,
        "public": True,
        "copyright_license": row["copyright_license"],
        "attribution": row["attribution"],
        "metadata": {"acquisition": acquisition, "clinical": clinical},
    }
    return MockImage(isic_id=isic_id, path=source_dir / f"{isic_id}.jpg", record=record)


class MockIsicArchive:
    """Mock ISIC API server, started and stopped by its context manager.

    Args:
        images: Images to serve, in the order the search lists them.
        page_size: Maximum results per search page. A request's `limit` may only lower it.
        collections: Collection id -> ids of the images in it, for the `collections` filter.
        license_texts: Licence id -> text served by the licence endpoint.
    """

    def __init__(
        self,
        images: list[MockImage],
        *,
        page_size: int = 4,
        collections: dict[int, set[str]] | None = None,
        license_texts: dict[str, str] | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}.")
        self.images = list(images)
        self.page_size = page_size
        self.collections = collections or {}
        self.license_texts = license_texts if license_texts is not None else _default_license_texts()
        self.requests: Counter[str] = Counter()

        self._lock = threading.Lock()
        self._status_faults: dict[str, list[int]] = {}
        self._drop_faults: Counter[str] = Counter()
        self._stall_faults: dict[str, list[float]] = {}
        self._missing: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("The mock ISIC server is not running. Use it inside a `with` block.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}{API_PREFIX}"

    def image(self, isic_id: str) -> MockImage:
        return next(image for image in self.images if image.isic_id == isic_id)

    def file_requests(self, isic_id: str) -> int:
        """Return how many times the image file of `isic_id` was requested."""
        with self._lock:
            return self.requests[f"{FILES_PREFIX}{isic_id}.jpg"]

    def search_requests(self) -> int:
        with self._lock:
            return self.requests[f"{API_PREFIX}/images/search/"]

    def respond_with_status(self, target: str, status: int, *, times: int = 1) -> None:
        """Respond with `status` to the next `times` requests for `target` (an isic_id or SEARCH_TARGET)."""
        with self._lock:
            self._status_faults.setdefault(target, []).extend([status] * times)

    def drop_connection_mid_body(self, isic_id: str, *, times: int = 1) -> None:
        """Close the connection after half of the image body, the next `times` requests."""
        with self._lock:
            self._drop_faults[isic_id] += times

    def stall(self, target: str, seconds: float, *, times: int = 1) -> None:
        """Wait `seconds` before responding to the next `times` requests for `target`."""
        with self._lock:
            self._stall_faults.setdefault(target, []).extend([seconds] * times)

    def make_missing(self, isic_id: str) -> None:
        """Respond with 404 to every request for the image file of `isic_id`."""
        with self._lock:
            self._missing.add(isic_id)

    def start(self) -> None:
        server = _QuietServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.archive = self  # type: ignore[attr-defined]
        self._server = server
        # A short poll interval makes stop() return in about 50 ms instead of 0.5 s.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="mock-isic-api", daemon=True
        )
        self._thread.start()
        logger.debug("Mock ISIC API serving %d images at %s", len(self.images), self.api_url)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> MockIsicArchive:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _take_fault(self, target: str) -> tuple[int | None, float, bool]:
        """Consume and return (status, stall seconds, drop mid-body) for one request."""
        with self._lock:
            statuses = self._status_faults.get(target)
            status = statuses.pop(0) if statuses else None
            stalls = self._stall_faults.get(target)
            stall_seconds = stalls.pop(0) if stalls else 0.0
            drop = self._drop_faults[target] > 0
            if drop:
                self._drop_faults[target] -= 1
            if status is None and target in self._missing:
                status = HTTPStatus.NOT_FOUND
            return status, stall_seconds, drop

    def _count_request(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def _matching_images(self, query: str, collection_ids: list[int]) -> list[MockImage]:
        """Filter by the query terms (AND) and by membership in any of the collections."""
        terms = _parse_query(query)
        matches = [image for image in self.images if all(_matches(image, field, value) for field, value in terms)]
        if collection_ids:
            members = set().union(*(self.collections.get(collection_id, set()) for collection_id in collection_ids))
            matches = [image for image in matches if image.isic_id in members]
        return matches


class _QueryError(ValueError):
    pass


def _parse_query(query: str) -> list[tuple[str, str]]:
    query = query.strip()
    if not query:
        return []

    terms = []
    for part in query.split(" AND "):
        match = _TERM.fullmatch(part.strip())
        if match is None:
            raise _QueryError(f"Invalid query: cannot parse {part.strip()!r}")
        value = match["quoted"] if match["quoted"] is not None else match["bare"]
        terms.append((match["field"], value))
    return terms


def _matches(image: MockImage, field: str, value: str) -> bool:
    record = image.record
    flat = {
        "isic_id": record["isic_id"],
        "copyright_license": record["copyright_license"],
        **record["metadata"]["acquisition"],
        **record["metadata"]["clinical"],
    }
    if field not in flat:
        return False
    actual = flat[field]
    actual_text = str(actual).lower() if isinstance(actual, bool) else str(actual)
    if value.endswith("*"):
        return actual_text.startswith(value[:-1])
    return actual_text == value


def _default_license_texts() -> dict[str, str]:
    license_path = ISIC_CC0_DIR / "LICENSE.txt"
    text = license_path.read_text(encoding="utf8") if license_path.is_file() else "CC0 1.0 Universal\n"
    return {"CC-0": text}


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o={offset}".encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        offset = int(text.removeprefix("o="))
    except ValueError as error:
        raise _QueryError(f"Invalid cursor {cursor!r}") from error
    if offset < 0:
        raise _QueryError(f"Invalid cursor {cursor!r}")
    return offset


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # Writes fail when the client timed out or dropped the connection. Fault tests expect
        # that, so the error is logged at DEBUG instead of printed to stderr.
        logger.debug("mock ISIC API: failed to respond to %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def archive(self) -> MockIsicArchive:
        return self.server.archive  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base-class name)
        logger.debug("mock ISIC API: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
        url = urlsplit(self.path)
        self.archive._count_request(url.path)

        if url.path == f"{API_PREFIX}/images/search/":
            self._serve_search(parse_qs(url.query, keep_blank_values=True))
        elif url.path.startswith(FILES_PREFIX):
            self._serve_file(url.path.removeprefix(FILES_PREFIX))
        elif url.path.startswith(LICENSE_PREFIX):
            self._serve_license(url.path.removeprefix(LICENSE_PREFIX).strip("/"))
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"detail": f"Not Found: {url.path}"})

    def _apply_faults(self, target: str) -> tuple[bool, bool]:
        """Apply stall and status faults, and return (responded, drop mid-body)."""
        status, stall_seconds, drop = self.archive._take_fault(target)
        if stall_seconds:
            time.sleep(stall_seconds)
        if status is not None:
            self._send_json(status, {"detail": HTTPStatus(status).phrase})
            return True, drop
        return False, drop

    def _serve_search(self, params: dict[str, list[str]]) -> None:
        responded, _ = self._apply_faults(SEARCH_TARGET)
        if responded:
            return

        query = params.get("query", [""])[0]
        collections_text = params.get("collections", [""])[0]
        try:
            collection_ids = [int(part) for part in collections_text.split(",") if part]
            limit = int(params.get("limit", [str(self.archive.page_size)])[0] or self.archive.page_size)
            offset = _decode_cursor(params["cursor"][0]) if "cursor" in params else 0
            matches = self.archive._matching_images(query, collection_ids)
        except ValueError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"message": str(error)})
            return

        page_size = max(1, min(limit, self.archive.page_size))
        page = matches[offset : offset + page_size]
        body = {
            "count": len(matches),
            "next": self._page_url(params, offset + page_size) if offset + page_size < len(matches) else None,
            "previous": self._page_url(params, max(0, offset - page_size)) if offset > 0 else None,
            "results": [self._api_record(image) for image in page],
        }
        self._send_json(HTTPStatus.OK, body)

    def _page_url(self, params: dict[str, list[str]], offset: int) -> str:
        page_params = {key: values[0] for key, values in params.items() if key != "cursor"}
        page_params["cursor"] = _encode_cursor(offset)
        return f"{self.archive.api_url}/images/search/?{urlencode(page_params)}"

    def _api_record(self, image: MockImage) -> dict:
        full = {"url": f"{self.archive.base_url}{FILES_PREFIX}{image.isic_id}.jpg", "size": image.size_bytes}
        return {**image.record, "files": {"full": full}}

    def _serve_file(self, file_name: str) -> None:
        isic_id = file_name.removesuffix(".jpg")
        responded, drop = self._apply_faults(isic_id)
        if responded:
            return
        try:
            body = self.archive.image(isic_id).path.read_bytes()
        except StopIteration:
            self._send_json(HTTPStatus.NOT_FOUND, {"detail": f"No image {isic_id}"})
            return

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:
            # Content-Length promised len(body) bytes, so closing after half of them makes
            # the client see a connection dropped mid-body.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _serve_license(self, license_id: str) -> None:
        text = self.archive.license_texts.get(license_id)
        if text is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"detail": f"No licence {license_id}"})
            return
        body = text.encode("utf8")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode("utf8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
