"""Download ISIC Archive images and metadata into the folder layout that isic-cli writes.

A download folder contains ``<isic_id>.jpg`` files, ``metadata.csv`` (one row per image,
columns as ``isic image download`` writes them), ``attribution.txt`` (the distinct
attributions), ``licenses/<license>.txt`` (licence texts), and ``attribution.csv``
(``isic_id,copyright_license,attribution`` per image).

The metadata flattening, the attribution list and the licence endpoint are isic-cli's own
functions (isic-cli 12.4). The paging, retry and download code is written here instead,
because isic-cli's versions cannot be configured: ``download_image`` waits at least 3 s
between attempts and its session backs off for minutes on HTTP 503, and ``get_images``
neither sends a page size nor retries a page whose body was cut off.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from enum import Enum
import io
import json
import logging
import math
import os
from pathlib import Path, PurePosixPath
import random
import re
import sys
import time
from typing import Any, TypeVar
from urllib.parse import urlparse

from isic_cli.cli.types import unsupported_diagnosis_message
from isic_cli.cli.utils import _extract_metadata, get_attributions
from isic_cli.io.http import get_license
from isic_cli.session import IsicCliSession
import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

logger = logging.getLogger(__name__)

ISIC_API_URL = "https://api.isic-archive.com/api/v2"

# ISIC search syntax: `field:value` terms joined by AND/OR. The ISIC server's query parser
# accepts `copyright_license` as a term and `-` inside values so that licence ids such as
# CC-0 parse (ImageMarkup/isic, isic/core/dsl.py).
DEFAULT_SAMPLE_QUERY = "image_type:dermoscopic AND copyright_license:CC-0"

SAMPLE_FOLDER_NAME = "isic-cc0-sample"
CACHE_ENV_VAR = "LESIONTUNE_CACHE"
COMPLETE_MARKER_NAME = ".lesiontune-complete.json"

# The ISIC API reads `limit` as the page size: isic-cli's get_num_images sends limit=1 to
# get one result and the total `count`.
# NOTE: the API's maximum page size is not documented, so 100 is an assumed safe value.
_MAX_PAGE_SIZE = 100
_RETRYABLE_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
_MAX_BACKOFF_SECONDS = 60.0
_CHUNK_BYTES = 1 << 20
# Image ids and licence ids become file names, so they may not contain path separators.
_SAFE_FILE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DATA_HINT = "or pass --data PATH to use a local folder of images instead"

_T = TypeVar("_T")


class FetchError(RuntimeError):
    """Network or ISIC API failure that remained after the retries."""


@dataclass(frozen=True)
class FetchReport:
    """Outcome of one `fetch_isic_images` run.

    `failed` contains `(isic_id, reason)` pairs in the order the API listed the images.
    """

    directory: Path
    downloaded: int
    skipped_existing: int
    failed: tuple[tuple[str, str], ...]


class _Outcome(Enum):
    DOWNLOADED = "downloaded"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class _ImageResult:
    isic_id: str
    outcome: _Outcome
    size_bytes: int = 0
    reason: str = ""
    # True when the last error was transient (connection, timeout, 429/5xx), so a
    # later run may succeed.
    transient: bool = False


@dataclass(frozen=True)
class _FetchResult:
    report: FetchReport
    transient_failures: frozenset[str]


@dataclass(frozen=True)
class _RetryPolicy:
    retries: int
    backoff_seconds: float

    def delay_seconds(self, attempt: int, error: BaseException) -> float:
        """Return the wait before retry `attempt` (0-based): exponential, jittered, capped."""
        delay = self.backoff_seconds * 2**attempt * random.uniform(0.5, 1.0)
        retry_after = _retry_after_seconds(error)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, _MAX_BACKOFF_SECONDS)


class _IncompleteDownloadError(Exception):
    """The body ended without an error but its size differs from `files.full.size`."""


def fetch_isic_images(
    destination: str | os.PathLike,
    *,
    query: str | None = None,
    collections: Sequence[int] = (),
    limit: int | None = None,
    api_url: str = ISIC_API_URL,
    retries: int = 5,
    timeout: float = 30.0,
    progress: bool = True,
    backoff_seconds: float = 1.0,
    workers: int = 8,
) -> FetchReport:
    """Download the images that match an ISIC search, with their metadata and licences.

    An image whose file already exists with the byte size that the API lists is skipped, so
    a rerun resumes an interrupted download. Each image is written to `<name>.part` and
    renamed when complete. An image that still fails after the retries is recorded in
    `FetchReport.failed` and the others continue. `metadata.csv`, `attribution.txt`,
    `attribution.csv` and `licenses/` then describe the images present (downloaded or
    skipped), in the order the API listed them.

    Args:
        destination: Folder to download into, created if missing.
        query: ISIC search query, e.g. 'image_type:dermoscopic AND age_approx:[20 TO 40]'.
            None or '' matches every image.
        collections: ISIC collection ids to search in; empty searches all collections.
        limit: Maximum number of images (>= 1); None downloads every match.
        api_url: Base URL of the ISIC API v2, without a trailing slash.
        retries: Retries per request after the first attempt (>= 0) for connection errors,
            timeouts and HTTP 429/5xx. Other HTTP errors are not retried.
        timeout: Seconds (> 0) to wait for a connection, and for each read from it.
        progress: Show a tqdm progress bar on stderr.
        backoff_seconds: Base of the exponential wait between retries, in seconds (>= 0).
            Retry k waits between 0.5 and 1 times `backoff_seconds * 2**k`, at most 60 s,
            and at least the server's Retry-After.
        workers: Number of images downloaded in parallel (>= 1).

    Returns:
        Counts of downloaded, skipped and failed images.

    Raises:
        ValueError: An argument is invalid, or the API rejected the query (HTTP 400).
        FetchError: Listing the images failed after the retries.
    """
    result = _fetch(
        destination,
        query=query,
        collections=collections,
        limit=limit,
        api_url=api_url,
        retries=retries,
        timeout=timeout,
        progress=progress,
        backoff_seconds=backoff_seconds,
        workers=workers,
    )
    return result.report


def default_sample_dir() -> Path:
    """Return the folder of the default CC-0 sample.

    The folder is `$LESIONTUNE_CACHE/isic-cc0-sample` when LESIONTUNE_CACHE is set, else
    `$XDG_CACHE_HOME/lesiontune/isic-cc0-sample`, else `~/.cache/lesiontune/isic-cc0-sample`.
    It is not created here.
    """
    cache_root = os.environ.get(CACHE_ENV_VAR)
    if cache_root:
        return Path(cache_root).expanduser() / SAMPLE_FOLDER_NAME

    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "lesiontune" / SAMPLE_FOLDER_NAME


def ensure_default_sample(
    *,
    api_url: str = ISIC_API_URL,
    limit: int = 2000,
    retries: int = 5,
    backoff_seconds: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download the default sample of CC-0 dermoscopic images once, and return its folder.

    When the folder contains a completion marker for the same query and limit, it is returned
    without any network access. Otherwise the images matching `DEFAULT_SAMPLE_QUERY` are
    fetched into `default_sample_dir()`, resuming any earlier partial download, and the
    marker is written. Images that the API refused with a non-retryable HTTP error (for
    example 404) do not prevent completion, because a rerun would not get them either.

    Call it once from the driver process, not from each trial.

    Args:
        api_url: Base URL of the ISIC API v2.
        limit: Number of images in the sample (>= 1).
        retries: Retries per request, as in `fetch_isic_images`.
        backoff_seconds: Base of the wait between retries in seconds, as in `fetch_isic_images`.
        progress: Show a tqdm progress bar on stderr.

    Raises:
        FetchError: The sample is not complete and could not be downloaded, for example
            offline. Its message explains how to pass a local folder with --data instead.
    """
    # NOTE: the marker check and the download are not locked, so two processes that call
    # this at the same time both download into the same folder and may corrupt a file.
    directory = default_sample_dir()
    if _is_marked_complete(directory, query=DEFAULT_SAMPLE_QUERY, limit=limit):
        logger.info("Using the ISIC sample already downloaded in %s", directory)
        return directory

    logger.info(
        "Downloading the default ISIC sample (%d images matching %r) into %s",
        limit,
        DEFAULT_SAMPLE_QUERY,
        directory,
    )
    try:
        result = _fetch(
            directory,
            query=DEFAULT_SAMPLE_QUERY,
            collections=(),
            limit=limit,
            api_url=api_url,
            retries=retries,
            timeout=30.0,
            progress=progress,
            backoff_seconds=backoff_seconds,
            workers=8,
        )
    except FetchError as error:
        raise FetchError(f"The default ISIC sample in {directory} is incomplete. {error}") from error

    if result.transient_failures:
        failed_ids = sorted(result.transient_failures)
        raise FetchError(
            f"The default ISIC sample in {directory} is incomplete: {len(failed_ids)} images "
            f"failed to download after {retries} retries (first: {failed_ids[0]}). "
            f"Check the network connection and run again to resume, {_DATA_HINT}."
        )

    _write_complete_marker(directory, query=DEFAULT_SAMPLE_QUERY, limit=limit, report=result.report)
    return directory


def _fetch(
    destination: str | os.PathLike,
    *,
    query: str | None,
    collections: Sequence[int],
    limit: int | None,
    api_url: str,
    retries: int,
    timeout: float,
    progress: bool,
    backoff_seconds: float,
    workers: int,
) -> _FetchResult:
    directory = _validate_destination(destination)
    query = _validate_query(query)
    collection_ids = _validate_collections(collections)
    _validate_arguments(
        limit=limit, retries=retries, timeout=timeout, backoff_seconds=backoff_seconds, workers=workers
    )
    api_url = _validate_api_url(api_url)
    policy = _RetryPolicy(retries=retries, backoff_seconds=backoff_seconds)

    directory.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Fetching %s images matching query %s (collections: %s) from %s into %s",
        "all" if limit is None else f"up to {limit}",
        repr(query) if query else "(none)",
        collection_ids or "all",
        api_url,
        directory,
    )
    started = time.monotonic()

    with _open_api_session(api_url) as api_session, _open_download_session(workers) as download_session:
        images, results = _download_search_results(
            api_session,
            download_session,
            directory,
            query=query,
            collections=collection_ids,
            limit=limit,
            policy=policy,
            timeout=timeout,
            progress=progress,
            workers=workers,
        )
        present = [
            image for image, result in zip(images, results) if result.outcome is not _Outcome.FAILED
        ]
        license_texts = _fetch_license_texts(api_session, present, policy=policy)

    _write_metadata_files(directory, present, license_texts)
    report = _summarize(directory, results, elapsed_seconds=time.monotonic() - started)
    transient = frozenset(result.isic_id for result in results if result.transient)
    return _FetchResult(report=report, transient_failures=transient)


def _validate_destination(destination: str | os.PathLike) -> Path:
    if not isinstance(destination, (str, os.PathLike)):
        raise TypeError(
            f"destination must be a folder path (str or os.PathLike), got {destination!r}. "
            "Pass the folder to download into, e.g. 'data/isic'."
        )
    if os.fspath(destination) == "":
        raise ValueError("destination is empty. Pass the folder to download into, e.g. 'data/isic'.")
    directory = Path(destination).expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"destination {str(directory)!r} exists and is not a folder. "
            "Pass a new or existing folder path instead."
        )
    return directory


def _validate_query(query: str | None) -> str:
    if query is None:
        return ""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str or None, got {type(query).__name__} {query!r}.")

    # isic-cli rejects the same pattern before it sends a query: the ISIC API replaced the
    # single `diagnosis` field by the hierarchy diagnosis_1 to diagnosis_5.
    if "diagnosis:" in query:
        raise ValueError(f"Invalid query {query!r}: {unsupported_diagnosis_message.strip()}")
    return query


def _validate_collections(collections: Sequence[int]) -> tuple[int, ...]:
    if isinstance(collections, (str, bytes)) or not isinstance(collections, Sequence):
        raise TypeError(
            f"collections must be a sequence of ISIC collection ids (int), got {collections!r}. "
            "Pass e.g. (65, 66), or () for all collections."
        )
    for collection_id in collections:
        if isinstance(collection_id, bool) or not isinstance(collection_id, int) or collection_id < 1:
            raise ValueError(
                f"collections contains {collection_id!r}, but ISIC collection ids are positive "
                "integers. Pass e.g. (65, 66), as listed by `isic collection list`."
            )
    return tuple(collections)


def _validate_arguments(
    *, limit: int | None, retries: int, timeout: float, backoff_seconds: float, workers: int
) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, or None for no limit, got {limit!r}.")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}. Use 0 to disable retries.")
    if not _is_positive_number(timeout):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}, e.g. 30.0.")
    if not (_is_positive_number(backoff_seconds) or backoff_seconds == 0):
        raise ValueError(
            f"backoff_seconds must be a number of seconds >= 0, got {backoff_seconds!r}, e.g. 1.0."
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}, e.g. 8.")


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value > 0


def _validate_api_url(api_url: str) -> str:
    parsed = urlparse(api_url) if isinstance(api_url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"api_url must be an http(s) URL of the ISIC API v2, got {api_url!r}. "
            f"Use the default {ISIC_API_URL!r}."
        )
    return api_url.rstrip("/")


def _open_api_session(api_url: str) -> IsicCliSession:
    # isic-cli's session resolves relative paths against the base URL, which its
    # get_license needs. Its own urllib3 retries are turned off because every request
    # here goes through _call_with_retries, which also retries a body cut off mid-transfer.
    no_transport_retries = Retry(total=0, redirect=False, raise_on_status=False)
    session = IsicCliSession(f"{api_url}/", retry_strategy=no_transport_retries)
    session.headers["User-Agent"] = "lesiontune (isic-cli)"
    return session


def _open_download_session(workers: int) -> requests.Session:
    # Image URLs are pre-signed, so this session carries no API headers. One session is
    # shared by the worker threads, which only send GET requests and keep no cookies.
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=workers, pool_maxsize=workers, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _download_search_results(
    api_session: IsicCliSession,
    download_session: requests.Session,
    directory: Path,
    *,
    query: str,
    collections: tuple[int, ...],
    limit: int | None,
    policy: _RetryPolicy,
    timeout: float,
    progress: bool,
    workers: int,
) -> tuple[list[dict], list[_ImageResult]]:
    """Page through the search, downloading each page's images before requesting the next.

    Going page by page means that no pre-signed image URL waits long before it is used.
    """
    images: list[dict] = []
    results: list[_ImageResult] = []
    progress_bar = None

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isic-fetch") as pool:
        try:
            pages = _iter_search_pages(
                api_session, query=query, collections=collections, limit=limit, policy=policy, timeout=timeout
            )
            for total_count, page in pages:
                if progress_bar is None:
                    expected = total_count if limit is None else min(total_count, limit)
                    progress_bar = tqdm(
                        total=expected,
                        unit="image",
                        desc="ISIC images",
                        file=sys.stderr,
                        disable=not progress,
                    )
                if limit is not None:
                    page = page[: limit - len(images)]

                futures = [
                    pool.submit(
                        _download_image, download_session, image, directory, policy=policy, timeout=timeout
                    )
                    for image in page
                ]
                for future in as_completed(futures):
                    progress_bar.update(1)
                images.extend(page)
                results.extend(future.result() for future in futures)

                if limit is not None and len(images) >= limit:
                    break
        finally:
            if progress_bar is not None:
                progress_bar.close()

    if not images:
        logger.warning("No ISIC images match query %r in collections %s", query, collections or "all")
    return images, results


def _iter_search_pages(
    session: IsicCliSession,
    *,
    query: str,
    collections: tuple[int, ...],
    limit: int | None,
    policy: _RetryPolicy,
    timeout: float,
) -> Iterator[tuple[int, list[dict]]]:
    """Yield `(count, results)` for each page of `images/search/`, following the `next` cursor.

    `count` is the number of matching images in the whole archive.
    """
    page_size = _MAX_PAGE_SIZE if limit is None else min(limit, _MAX_PAGE_SIZE)
    params: dict[str, Any] | None = {
        "query": query,
        "collections": ",".join(str(collection_id) for collection_id in collections),
        "limit": page_size,
    }
    url: str | None = "images/search/"
    page_number = 0

    while url:
        page_number += 1
        page = _get_search_page(
            session, url, params=params, query=query, policy=policy, timeout=timeout
        )
        logger.debug("Search page %d: %d results", page_number, len(page["results"]))
        yield page["count"], page["results"]

        # An empty page ends the search even if it has a `next` URL, so that a faulty
        # cursor cannot loop forever.
        if not page["results"]:
            return
        # The `next` URL already carries the query, the page size and the cursor.
        url, params = page["next"], None


def _get_search_page(
    session: IsicCliSession,
    url: str,
    *,
    params: dict[str, Any] | None,
    query: str,
    policy: _RetryPolicy,
    timeout: float,
) -> dict:
    def request_page() -> dict:
        response = session.get(url, params=params, timeout=timeout)
        response.raise_for_status()
        return response.json()

    try:
        page = _call_with_retries(request_page, description=f"ISIC image search ({url})", policy=policy)
    except requests.HTTPError as error:
        if error.response is not None and error.response.status_code == 400:
            raise ValueError(
                f"The ISIC API rejected query {query!r}: {_response_message(error.response)}. "
                "Use the ISIC search syntax, e.g. 'image_type:dermoscopic AND age_approx:[20 TO 40]', "
                "and check that the collection ids exist."
            ) from error
        raise _fetch_error("Listing ISIC images failed", error, policy=policy) from error
    except requests.RequestException as error:
        raise _fetch_error("Listing ISIC images failed", error, policy=policy) from error

    if (
        not isinstance(page, dict)
        or not isinstance(page.get("count"), int)
        or not isinstance(page.get("results"), list)
        or "next" not in page
    ):
        raise FetchError(
            f"The ISIC image search at {url} returned a response without 'count', 'results' "
            f"and 'next'. Check that the API URL points to the ISIC API v2 (default {ISIC_API_URL})."
        )
    return page


def _download_image(
    session: requests.Session,
    image: dict,
    directory: Path,
    *,
    policy: _RetryPolicy,
    timeout: float,
) -> _ImageResult:
    """Download one image unless a file of the listed size exists.

    Network errors are returned as a failed result; file system errors are raised.
    """
    isic_id = str(image.get("isic_id", ""))
    try:
        url, expected_size = _full_image_file(image)
    except ValueError as error:
        logger.warning("Not downloading image %r: %s", isic_id, error)
        return _ImageResult(isic_id, _Outcome.FAILED, reason=str(error))

    path = directory / f"{isic_id}.{_file_extension(url)}"
    if expected_size is not None and path.is_file() and path.stat().st_size == expected_size:
        logger.debug(
            "Skipping %s: %s already has the listed size of %d bytes", isic_id, path, expected_size
        )
        return _ImageResult(isic_id, _Outcome.SKIPPED, size_bytes=expected_size)

    part_path = path.with_name(f"{path.name}.part")
    try:
        _call_with_retries(
            lambda: _stream_to_file(
                session, url, part_path, expected_size=expected_size, timeout=timeout
            ),
            description=f"download of {isic_id}",
            policy=policy,
        )
    except (requests.RequestException, _IncompleteDownloadError) as error:
        part_path.unlink(missing_ok=True)
        reason = _describe_error(error)
        transient = _is_transient(error)
        attempts = f"after {policy.retries} retries" if transient else "not retried"
        logger.warning("Download of %s failed (%s): %s", isic_id, attempts, reason)
        return _ImageResult(isic_id, _Outcome.FAILED, reason=reason, transient=transient)

    size = part_path.stat().st_size
    os.replace(part_path, path)
    return _ImageResult(isic_id, _Outcome.DOWNLOADED, size_bytes=size)


def _full_image_file(image: dict) -> tuple[str, int | None]:
    """Return the URL and listed byte size (None when absent) of an API record's full image.

    Raises ValueError when the record lacks a field that the download or metadata.csv needs.
    """
    isic_id = image.get("isic_id")
    if not isinstance(isic_id, str) or not _SAFE_FILE_STEM.fullmatch(isic_id):
        raise ValueError(f"the API record has an invalid isic_id {isic_id!r}")
    try:
        full = image["files"]["full"]
        url = full["url"]
    except (KeyError, TypeError):
        raise ValueError("the API record has no files.full.url") from None

    size = full.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"the API record has an invalid files.full.size {size!r}")

    # isic-cli's _extract_metadata reads these fields when metadata.csv is written.
    metadata = image.get("metadata")
    for section in ("acquisition", "clinical"):
        if not isinstance(metadata, dict) or not isinstance(metadata.get(section), dict):
            raise ValueError(f"the API record has no metadata.{section} object")
    for field in ("attribution", "copyright_license"):
        if field not in image:
            raise ValueError(f"the API record has no {field}")
    return url, size


def _file_extension(url: str) -> str:
    # Same rule as isic-cli's download_image: the URL path's suffix, or jpg when it has none.
    extension = PurePosixPath(urlparse(url).path).suffix.lstrip(".")
    return extension if extension.isalnum() else "jpg"


def _stream_to_file(
    session: requests.Session, url: str, part_path: Path, *, expected_size: int | None, timeout: float
) -> None:
    with session.get(url, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        with part_path.open("wb") as part_file:
            for chunk in response.iter_content(_CHUNK_BYTES):
                part_file.write(chunk)

    written = part_path.stat().st_size
    if expected_size is not None and written != expected_size:
        raise _IncompleteDownloadError(
            f"received {written} bytes, but the API lists {expected_size} bytes"
        )


def _call_with_retries(action: Callable[[], _T], *, description: str, policy: _RetryPolicy) -> _T:
    """Run `action`, retrying transient errors up to `policy.retries` times.

    urllib3's Retry cannot do this alone: it does not retry a body that is cut off after
    the headers arrived.
    """
    attempt = 0
    while True:
        try:
            return action()
        except (requests.RequestException, _IncompleteDownloadError) as error:
            if attempt == policy.retries or not _is_transient(error):
                raise
            delay = policy.delay_seconds(attempt, error)
            attempt += 1
            logger.warning(
                "%s failed (%s), retry %d of %d in %.2f s",
                description[:1].upper() + description[1:],
                _describe_error(error),
                attempt,
                policy.retries,
                delay,
            )
            time.sleep(delay)


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, requests.HTTPError):
        return error.response is not None and error.response.status_code in _RETRYABLE_STATUS_CODES
    # Connection errors, timeouts and bodies cut short (ChunkedEncodingError), plus a JSON
    # body that fails to parse, because that can be a truncated response.
    return isinstance(
        error,
        (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
            requests.exceptions.JSONDecodeError,
            _IncompleteDownloadError,
        ),
    )


def _retry_after_seconds(error: BaseException) -> float | None:
    if not isinstance(error, requests.HTTPError) or error.response is None:
        return None
    value = error.response.headers.get("Retry-After", "")
    # Only the delay-seconds form; the HTTP-date form falls back to the exponential backoff.
    return float(value) if value.strip().isdigit() else None


def _describe_error(error: BaseException) -> str:
    if isinstance(error, requests.HTTPError) and error.response is not None:
        response = error.response
        # The query string of a pre-signed image URL is long and carries its signature.
        url = response.url.split("?", 1)[0]
        return f"HTTP {response.status_code} {response.reason} from {url}"
    return f"{type(error).__name__}: {error}"


def _response_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or f"HTTP {response.status_code}"
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return str(body)[:200]


def _fetch_error(what_failed: str, error: BaseException, *, policy: _RetryPolicy) -> FetchError:
    attempts = f"after {policy.retries} retries" if _is_transient(error) else "not retried"
    return FetchError(
        f"{what_failed} ({attempts}): {_describe_error(error)}. Check the network connection and "
        f"the API URL, then run again to resume (complete images are kept), {_DATA_HINT}."
    )


def _fetch_license_texts(
    session: IsicCliSession, images: Sequence[dict], *, policy: _RetryPolicy
) -> dict[str, str]:
    """Fetch the licence text of each licence that `images` use, keyed by licence id."""
    license_ids = sorted({str(image.get("copyright_license", "")) for image in images})
    texts = {}
    for license_id in license_ids:
        if not _SAFE_FILE_STEM.fullmatch(license_id):
            logger.warning("Not writing a licence file for the invalid licence id %r", license_id)
            continue
        try:
            # get_license sends no timeout, so the default of isic-cli 12.4's IsicCliSession
            # applies: 3.05 s to connect and 15 s to read.
            texts[license_id] = _call_with_retries(
                lambda license_id=license_id: get_license(session, license_id),
                description=f"download of the licence text {license_id}",
                policy=policy,
            )
        except requests.RequestException as error:
            # The licence id of every image is still in metadata.csv and attribution.csv.
            logger.warning(
                "Not writing licenses/%s.txt: the download of its text failed (%s)",
                license_id,
                _describe_error(error),
            )
    return texts


def _write_metadata_files(
    directory: Path, images: Sequence[dict], license_texts: dict[str, str]
) -> None:
    """Write metadata.csv, attribution.txt, attribution.csv and licenses/ as isic-cli does."""
    headers, records = _extract_metadata(images)
    _write_text_atomically(directory / "metadata.csv", _format_csv(headers, records))
    _write_text_atomically(directory / "attribution.txt", "\n\n".join(get_attributions(records)))

    per_image_columns = ["isic_id", "copyright_license", "attribution"]
    per_image_rows = [{column: record[column] for column in per_image_columns} for record in records]
    _write_text_atomically(
        directory / "attribution.csv", _format_csv(per_image_columns, per_image_rows)
    )

    licenses_dir = directory / "licenses"
    licenses_dir.mkdir(exist_ok=True)
    for license_id, text in license_texts.items():
        _write_text_atomically(licenses_dir / f"{license_id}.txt", text)


def _format_csv(headers: Sequence[str], rows: Sequence[dict]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, headers)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_text_atomically(path: Path, text: str) -> None:
    part_path = path.with_name(f"{path.name}.part")
    with part_path.open("w", encoding="utf8", newline="") as part_file:
        part_file.write(text)
    os.replace(part_path, path)


def _summarize(
    directory: Path, results: Sequence[_ImageResult], *, elapsed_seconds: float
) -> FetchReport:
    downloaded = [result for result in results if result.outcome is _Outcome.DOWNLOADED]
    skipped = [result for result in results if result.outcome is _Outcome.SKIPPED]
    failed = tuple(
        (result.isic_id, result.reason) for result in results if result.outcome is _Outcome.FAILED
    )

    downloaded_mib = sum(result.size_bytes for result in downloaded) / 2**20
    logger.info(
        "ISIC fetch into %s: %d downloaded (%.1f MiB, %.1f MiB/s), %d already present, "
        "%d failed, %.1f s",
        directory,
        len(downloaded),
        downloaded_mib,
        downloaded_mib / max(elapsed_seconds, 1e-9),
        len(skipped),
        len(failed),
        elapsed_seconds,
    )
    return FetchReport(
        directory=directory, downloaded=len(downloaded), skipped_existing=len(skipped), failed=failed
    )


def _is_marked_complete(directory: Path, *, query: str, limit: int) -> bool:
    marker_path = directory / COMPLETE_MARKER_NAME
    if not marker_path.is_file():
        return False
    try:
        marker = json.loads(marker_path.read_text(encoding="utf8"))
    except (OSError, ValueError) as error:
        logger.warning("Ignoring the unreadable completion marker %s: %s", marker_path, error)
        return False

    if not isinstance(marker, dict) or marker.get("query") != query or marker.get("limit") != limit:
        logger.info(
            "The sample in %s was downloaded for another query or limit (%s), so it is downloaded again",
            directory,
            marker,
        )
        return False
    return True


def _write_complete_marker(directory: Path, *, query: str, limit: int, report: FetchReport) -> None:
    marker = {
        "query": query,
        "limit": limit,
        "images": report.downloaded + report.skipped_existing,
        "failed": [isic_id for isic_id, _ in report.failed],
    }
    _write_text_atomically(directory / COMPLETE_MARKER_NAME, json.dumps(marker, indent=2) + "\n")
