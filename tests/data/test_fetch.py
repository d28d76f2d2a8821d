"""Tests of data.fetch against the mock ISIC API in isic_mock_server (127.0.0.1 only)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
import socket

import pytest

from data.fetch import (
    COMPLETE_MARKER_NAME,
    DEFAULT_SAMPLE_QUERY,
    FetchError,
    FetchReport,
    default_sample_dir,
    ensure_default_sample,
    fetch_isic_images,
)
from isic_mock_server import (
    ISIC_CC0_DIR,
    SEARCH_TARGET,
    MockImage,
    MockIsicArchive,
    load_mock_images,
    shared_data_missing_reason,
)

_MISSING_DATA_REASON = shared_data_missing_reason()
pytestmark = pytest.mark.skipif(_MISSING_DATA_REASON is not None, reason=str(_MISSING_DATA_REASON))

# A tiny backoff makes retries cost milliseconds. The timeout matters only in the stall test.
FAST = {"retries": 3, "backoff_seconds": 0.001, "timeout": 5.0, "progress": False, "workers": 4}


@pytest.fixture(scope="module")
def mock_images() -> list[MockImage]:
    return load_mock_images(count=10)


@pytest.fixture
def archive(mock_images: list[MockImage]):
    with MockIsicArchive(mock_images, page_size=4) as server:
        yield server


@pytest.fixture
def closed_port_url() -> str:
    """Return an API URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v2"


def _jpg_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.jpg"))


def _part_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.part"))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf8") as csv_file:
        reader = csv.DictReader(csv_file)
        return list(reader.fieldnames or []), list(reader)


def _assert_bytes_match_source(directory: Path, images: list[MockImage]) -> None:
    for image in images:
        downloaded = directory / f"{image.isic_id}.jpg"
        assert downloaded.read_bytes() == image.path.read_bytes(), image.isic_id


def test_fetch_all_pages_byte_exact(archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path):
    report = fetch_isic_images(tmp_path / "isic", api_url=archive.api_url, **FAST)

    assert report == FetchReport(directory=tmp_path / "isic", downloaded=10, skipped_existing=0, failed=())
    assert _jpg_names(tmp_path / "isic") == [f"{image.isic_id}.jpg" for image in mock_images]
    _assert_bytes_match_source(tmp_path / "isic", mock_images)
    # 10 images at 4 per page.
    assert archive.search_requests() == 3
    assert _part_files(tmp_path / "isic") == []


def test_fetch_limit_respected(archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path):
    report = fetch_isic_images(tmp_path, api_url=archive.api_url, limit=6, **FAST)

    assert report.downloaded == 6
    assert _jpg_names(tmp_path) == [f"{image.isic_id}.jpg" for image in mock_images[:6]]
    _, rows = _read_csv(tmp_path / "metadata.csv")
    assert [row["isic_id"] for row in rows] == [image.isic_id for image in mock_images[:6]]
    # The API clamps the requested page size of 6 to 4, so the limit ends on page 2.
    assert archive.search_requests() == 2


def test_fetch_limit_within_first_page(archive: MockIsicArchive, tmp_path: Path):
    report = fetch_isic_images(tmp_path, api_url=archive.api_url, limit=3, **FAST)

    assert report.downloaded == 3
    assert archive.search_requests() == 1


def test_fetch_dropped_connection_recovers(
    archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path
):
    isic_id = mock_images[5].isic_id
    archive.drop_connection_mid_body(isic_id, times=2)

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    assert report.failed == ()
    assert report.downloaded == 10
    assert archive.file_requests(isic_id) == 3
    _assert_bytes_match_source(tmp_path, mock_images)
    assert _part_files(tmp_path) == []


@pytest.mark.parametrize("status", [429, 500, 503])
def test_fetch_transient_status_retried(
    archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path, status: int
):
    isic_id = mock_images[2].isic_id
    archive.respond_with_status(isic_id, status)
    archive.respond_with_status(SEARCH_TARGET, status)

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    assert report.failed == ()
    assert report.downloaded == 10
    assert archive.file_requests(isic_id) == 2
    assert archive.search_requests() == 4
    _assert_bytes_match_source(tmp_path, mock_images)


def test_fetch_read_timeout_retried(archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path):
    isic_id = mock_images[1].isic_id
    archive.stall(isic_id, seconds=1.5)

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **{**FAST, "timeout": 0.5})

    assert report.failed == ()
    assert archive.file_requests(isic_id) == 2
    _assert_bytes_match_source(tmp_path, mock_images)


def test_fetch_404_recorded_others_continue(
    archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path
):
    missing_id = mock_images[4].isic_id
    archive.make_missing(missing_id)

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    assert report.downloaded == 9
    assert [isic_id for isic_id, _ in report.failed] == [missing_id]
    assert "HTTP 404" in report.failed[0][1]
    # A 404 is not retried.
    assert archive.file_requests(missing_id) == 1
    present = [image for image in mock_images if image.isic_id != missing_id]
    assert _jpg_names(tmp_path) == [f"{image.isic_id}.jpg" for image in present]
    _assert_bytes_match_source(tmp_path, present)
    _, rows = _read_csv(tmp_path / "metadata.csv")
    assert [row["isic_id"] for row in rows] == [image.isic_id for image in present]
    assert _part_files(tmp_path) == []


def test_fetch_retries_exhausted_recorded(
    archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path
):
    isic_id = mock_images[7].isic_id
    archive.drop_connection_mid_body(isic_id, times=10)

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **{**FAST, "retries": 2})

    assert [failed_id for failed_id, _ in report.failed] == [isic_id]
    assert "ChunkedEncodingError" in report.failed[0][1]
    assert archive.file_requests(isic_id) == 3
    assert report.downloaded == 9
    assert not (tmp_path / f"{isic_id}.jpg").exists()
    assert _part_files(tmp_path) == []


def test_fetch_second_run_skips_existing(archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path):
    fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)
    requests_after_first_run = sum(archive.file_requests(image.isic_id) for image in mock_images)

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    assert report.downloaded == 0
    assert report.skipped_existing == 10
    assert report.failed == ()
    assert sum(archive.file_requests(image.isic_id) for image in mock_images) == requests_after_first_run
    _, rows = _read_csv(tmp_path / "metadata.csv")
    assert len(rows) == 10


def test_fetch_partial_files_redownloaded(
    archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path
):
    fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)
    truncated = tmp_path / f"{mock_images[0].isic_id}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:100])
    interrupted = tmp_path / f"{mock_images[3].isic_id}.jpg"
    interrupted.unlink()
    interrupted.with_name(f"{interrupted.name}.part").write_bytes(b"half an image")

    report = fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    assert report.downloaded == 2
    assert report.skipped_existing == 8
    _assert_bytes_match_source(tmp_path, mock_images)
    assert _part_files(tmp_path) == []


def test_fetch_metadata_csv_layout(archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path):
    fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    columns, rows = _read_csv(tmp_path / "metadata.csv")
    # isic-cli's layout: three fixed columns, then the metadata fields in sorted order.
    assert columns[:3] == ["isic_id", "attribution", "copyright_license"]
    assert columns[3:] == sorted(columns[3:])
    for column in ("diagnosis_1", "benign_malignant", "diagnosis", "image_type", "pixels_x"):
        assert column in columns
    assert [row["isic_id"] for row in rows] == [image.isic_id for image in mock_images]

    _, source_rows = _read_csv(ISIC_CC0_DIR / "metadata.csv")
    source_by_id = {row["isic_id"]: row for row in source_rows}
    for row in rows:
        source = source_by_id[row["isic_id"]]
        assert row["benign_malignant"] == source["benign_malignant"]
        assert row["diagnosis_1"] == source["benign_malignant"].capitalize()
        assert row["copyright_license"] == "CC-0"


def test_fetch_attribution_and_licenses_written(mock_images: list[MockImage], tmp_path: Path):
    clinic_ids = {mock_images[1].isic_id, mock_images[2].isic_id}
    images = [
        dataclasses.replace(image, record={**image.record, "attribution": "Test Clinic"})
        if image.isic_id in clinic_ids
        else image
        for image in mock_images
    ]

    with MockIsicArchive(images, page_size=4) as archive:
        fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    # isic-cli's order: most images first, Anonymous last.
    assert (tmp_path / "attribution.txt").read_text(encoding="utf8") == "Test Clinic\n\nAnonymous"
    columns, rows = _read_csv(tmp_path / "attribution.csv")
    assert columns == ["isic_id", "copyright_license", "attribution"]
    assert [row["isic_id"] for row in rows] == [image.isic_id for image in images]
    for row in rows:
        assert row["copyright_license"] == "CC-0"
        assert row["attribution"] == ("Test Clinic" if row["isic_id"] in clinic_ids else "Anonymous")
    license_text = (tmp_path / "licenses" / "CC-0.txt").read_text(encoding="utf8")
    assert license_text == (ISIC_CC0_DIR / "LICENSE.txt").read_text(encoding="utf8")


def test_fetch_query_filters_results(archive: MockIsicArchive, mock_images: list[MockImage], tmp_path: Path):
    report = fetch_isic_images(tmp_path, query="diagnosis_1:Malignant", api_url=archive.api_url, **FAST)

    malignant = [image for image in mock_images if image.record["metadata"]["clinical"]["diagnosis_1"] == "Malignant"]
    assert len(malignant) >= 1
    assert report.downloaded == len(malignant)
    assert _jpg_names(tmp_path) == [f"{image.isic_id}.jpg" for image in malignant]


def test_fetch_collections_filter(mock_images: list[MockImage], tmp_path: Path):
    members = {mock_images[1].isic_id, mock_images[8].isic_id}

    with MockIsicArchive(mock_images, page_size=4, collections={7: members}) as archive:
        report = fetch_isic_images(tmp_path, collections=(7,), api_url=archive.api_url, **FAST)

    assert report.downloaded == 2
    assert _jpg_names(tmp_path) == sorted(f"{isic_id}.jpg" for isic_id in members)


def test_fetch_no_match_writes_empty_metadata(archive: MockIsicArchive, tmp_path: Path):
    report = fetch_isic_images(tmp_path, query="isic_id:ISIC_9999999", api_url=archive.api_url, **FAST)

    assert report == FetchReport(directory=tmp_path, downloaded=0, skipped_existing=0, failed=())
    columns, rows = _read_csv(tmp_path / "metadata.csv")
    assert columns == ["isic_id", "attribution", "copyright_license"]
    assert rows == []


def test_fetch_invalid_query_raises(archive: MockIsicArchive, tmp_path: Path):
    with pytest.raises(ValueError, match=r"rejected query '\(\(\(': Invalid query"):
        fetch_isic_images(tmp_path, query="(((", api_url=archive.api_url, **FAST)


def test_fetch_legacy_diagnosis_query_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="diagnosis_1-5"):
        fetch_isic_images(tmp_path, query="diagnosis:melanoma", api_url="http://127.0.0.1:9/api/v2", **FAST)


@pytest.mark.parametrize(
    ("arguments", "error_type", "message"),
    [
        ({"limit": 0}, ValueError, r"limit must be an integer >= 1, or None .* got 0"),
        ({"limit": True}, ValueError, r"limit must be an integer >= 1"),
        ({"retries": -1}, ValueError, r"retries must be an integer >= 0, got -1"),
        ({"timeout": 0}, ValueError, r"timeout must be a number of seconds > 0, got 0"),
        ({"backoff_seconds": -1.0}, ValueError, r"backoff_seconds must be .* >= 0, got -1.0"),
        ({"workers": 0}, ValueError, r"workers must be an integer >= 1, got 0"),
        ({"collections": "1,2"}, TypeError, r"collections must be a sequence .* got '1,2'. Pass e.g. \(65, 66\)"),
        ({"collections": (0,)}, ValueError, r"collections contains 0"),
        ({"api_url": "ftp://example.org"}, ValueError, r"api_url must be an http\(s\) URL .* got 'ftp://example.org'"),
    ],
)
def test_fetch_invalid_arguments_raise(tmp_path: Path, arguments: dict, error_type: type, message: str):
    options = {**FAST, "api_url": "http://127.0.0.1:9/api/v2", **arguments}

    with pytest.raises(error_type, match=message):
        fetch_isic_images(tmp_path, **options)


def test_fetch_destination_is_file_raises(tmp_path: Path):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")

    with pytest.raises(ValueError, match=r"destination .*file.txt' exists and is not a folder"):
        fetch_isic_images(not_a_folder, api_url="http://127.0.0.1:9/api/v2", **FAST)


def test_fetch_offline_raises_fetch_error(closed_port_url: str, tmp_path: Path):
    with pytest.raises(FetchError, match=r"Listing ISIC images failed \(after 3 retries\): ConnectionError.*--data PATH"):
        fetch_isic_images(tmp_path, api_url=closed_port_url, **FAST)


def test_fetch_search_404_not_retried(archive: MockIsicArchive, tmp_path: Path):
    archive.respond_with_status(SEARCH_TARGET, 404)

    with pytest.raises(FetchError, match=r"\(not retried\): HTTP 404 Not Found.*--data PATH"):
        fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)
    assert archive.search_requests() == 1


def test_fetch_progress_bar_on_stderr(archive: MockIsicArchive, tmp_path: Path, capsys: pytest.CaptureFixture):
    fetch_isic_images(tmp_path, api_url=archive.api_url, **{**FAST, "progress": True})

    captured = capsys.readouterr()
    assert "ISIC images" in captured.err
    assert "10/10" in captured.err
    assert captured.out == ""


def test_default_sample_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LESIONTUNE_CACHE", str(tmp_path / "cache"))
    assert default_sample_dir() == tmp_path / "cache" / "isic-cc0-sample"

    monkeypatch.delenv("LESIONTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_sample_dir() == tmp_path / "xdg" / "lesiontune" / "isic-cc0-sample"


def test_ensure_default_sample_then_offline(
    archive: MockIsicArchive, mock_images: list[MockImage], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("LESIONTUNE_CACHE", str(tmp_path))
    options = {"limit": 5, "backoff_seconds": 0.001, "progress": False}

    directory = ensure_default_sample(api_url=archive.api_url, **options)

    assert directory == tmp_path / "isic-cc0-sample"
    assert _jpg_names(directory) == [f"{image.isic_id}.jpg" for image in mock_images[:5]]
    marker = json.loads((directory / COMPLETE_MARKER_NAME).read_text(encoding="utf8"))
    assert marker == {"query": DEFAULT_SAMPLE_QUERY, "limit": 5, "images": 5, "failed": []}

    api_url = archive.api_url
    archive.stop()
    assert ensure_default_sample(api_url=api_url, **options) == directory


def test_ensure_default_sample_offline_raises(
    closed_port_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("LESIONTUNE_CACHE", str(tmp_path))

    with pytest.raises(FetchError, match=r"default ISIC sample .* is incomplete.*--data PATH"):
        ensure_default_sample(api_url=closed_port_url, limit=5, retries=1, backoff_seconds=0.001, progress=False)
    assert not (tmp_path / "isic-cc0-sample" / COMPLETE_MARKER_NAME).exists()


def test_ensure_default_sample_transient_failure_resumes(
    archive: MockIsicArchive, mock_images: list[MockImage], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("LESIONTUNE_CACHE", str(tmp_path))
    isic_id = mock_images[2].isic_id
    archive.drop_connection_mid_body(isic_id, times=2)
    options = {"api_url": archive.api_url, "limit": 5, "retries": 1, "backoff_seconds": 0.001, "progress": False}

    with pytest.raises(FetchError, match=rf"1 images failed .*first: {isic_id}.*run again to resume"):
        ensure_default_sample(**options)
    directory = tmp_path / "isic-cc0-sample"
    assert not (directory / COMPLETE_MARKER_NAME).exists()

    assert ensure_default_sample(**options) == directory
    assert archive.file_requests(mock_images[0].isic_id) == 1
    _assert_bytes_match_source(directory, mock_images[:5])


def test_ensure_default_sample_completes_despite_404(
    archive: MockIsicArchive, mock_images: list[MockImage], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("LESIONTUNE_CACHE", str(tmp_path))
    missing_id = mock_images[3].isic_id
    archive.make_missing(missing_id)

    directory = ensure_default_sample(api_url=archive.api_url, limit=5, backoff_seconds=0.001, progress=False)

    marker = json.loads((directory / COMPLETE_MARKER_NAME).read_text(encoding="utf8"))
    assert marker["images"] == 4
    assert marker["failed"] == [missing_id]


def test_fetch_malformed_record_recorded(mock_images: list[MockImage], tmp_path: Path):
    broken_id = mock_images[1].isic_id
    record_without_metadata = {key: value for key, value in mock_images[1].record.items() if key != "metadata"}
    images = [mock_images[0], dataclasses.replace(mock_images[1], record=record_without_metadata)]

    with MockIsicArchive(images, page_size=4) as archive:
        report = fetch_isic_images(tmp_path, api_url=archive.api_url, **FAST)

    assert report.downloaded == 1
    assert report.failed == ((broken_id, "the API record has no metadata.acquisition object"),)
    assert archive.file_requests(broken_id) == 0
    _, rows = _read_csv(tmp_path / "metadata.csv")
    assert [row["isic_id"] for row in rows] == [mock_images[0].isic_id]
