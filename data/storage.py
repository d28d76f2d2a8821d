"""Run folders on a local disk or in object storage, through ``pyarrow.fs``.

A storage path is either a plain path (``~/lesiontune_runs``), used as a local folder, or a URI that
``pyarrow.fs.FileSystem.from_uri`` reads. The URIs are ``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX``,
``abfs://ACCOUNT@CONTAINER/PREFIX`` (Azure Blob Storage, also as ``abfss://``) and ``file:///ABSOLUTE/PATH``.
Compatible servers are reached through the query, e.g.
``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``.
Credentials come from the environment (``AWS_ACCESS_KEY_ID`` ..., ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_KEY``) or from the URI's user part (``s3://KEY:SECRET@bucket/...``,
``abfs://ACCOUNT:KEY@HOST:PORT/CONTAINER/...``). Messages and logs show a URI with the user part and
secret-looking query values replaced by ``***``.

pyarrow 26 reads neither an Azure account key nor anonymous GCS access from a URI, so this module adds both:
the password of an ``abfs://`` URI (or ``AZURE_STORAGE_KEY``) becomes the account key, and the query key
``anonymous=true`` of a ``gs://`` URI selects anonymous access, which emulators and public buckets need.

Failures of the storage service become one-line errors that name the storage path, what failed and the fix:
``ValueError`` (invalid URI), ``FileNotFoundError`` (missing bucket or file), ``PermissionError`` (access denied)
or :class:`StorageError` (endpoint unreachable, any other failure).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["StorageError", "StoragePath", "check_storage_reachable", "download_run_files", "is_outside_checkpoints",
           "is_uri", "list_names", "mask_credentials", "path_exists", "read_bytes", "read_text",
           "resolve_storage_path", "upload_files", "write_bytes", "write_text"]

logger = logging.getLogger(__name__)

# Filesystems whose first path component is a bucket (S3, GCS) or a container (Azure), which must exist already.
BUCKET_FILESYSTEMS = ("s3", "gcs", "abfs")
CHECKPOINT_FOLDER_PREFIX = "checkpoint_"
MASK = "***"

_URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_SECRET_QUERY_KEY = re.compile(r"key|secret|token|password|credential|^sig$", re.IGNORECASE)
# Query keys whose values name a kind of credential or a flag, not a secret.
_PUBLIC_QUERY_KEYS = ("credential_kind",)
_MAX_DETAIL_CHARS = 300
_MIN_MASKED_CHARS = 4

# Fragments of pyarrow's error text (AWS SDK error names, curl, Google Cloud and Azure status codes) by cause.
_MISSING_BUCKET_MARKERS = ("NO_SUCH_BUCKET", "NoSuchBucket", "specified bucket does not exist", "ContainerNotFound",
                           "specified container does not exist")
_ACCESS_MARKERS = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                   "EXPIRED_TOKEN", "HTTP status 401", "HTTP status 403", "status code: 401", "status code: 403",
                   "PERMISSION_DENIED", "UNAUTHENTICATED", "OAuth2 access token", "AuthorizationFailure",
                   "AuthenticationFailed", "credentials")
_CONNECTION_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect", "Could not resolve",
                       "Couldn't resolve", "Connection refused", "timed out", "UNAVAILABLE")

# Query keys of an abfs:// URI that select a credential, so that an account key must not replace it.
_AZURE_CREDENTIAL_QUERY_KEYS = ("credential_kind", "tenant_id", "client_id", "client_secret", "sig")
AZURE_KEY_VARIABLE = "AZURE_STORAGE_KEY"
# The lesiontune query key of a gs:// URI for anonymous access; pyarrow's GCS URI has no such key.
GCS_ANONYMOUS_QUERY_KEY = "anonymous"
_TRUE_TEXTS = ("true", "1", "yes")
_FALSE_TEXTS = ("false", "0", "no")


class StorageError(OSError):
    """The storage service failed or cannot be reached; the message names the storage path and the fix."""


@dataclass(frozen=True, repr=False)
class StoragePath:
    """A file or folder: a local path, or a location on a ``pyarrow.fs`` filesystem given by a URI.

    ``str()`` returns the location for messages and logs, with credentials masked.
    """

    filesystem: pafs.FileSystem
    path: str  # on ``filesystem``: "/abs/runs/NAME" locally, "bucket/runs/NAME" for s3://, gs:// and abfs://
    uri: str  # as given (resolved when local); may contain credentials, so never log it

    @property
    def is_local(self) -> bool:
        """True for a plain local path, False for a URI (``file://`` URIs included)."""
        return not is_uri(self.uri)

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0].lower() if is_uri(self.uri) else ""

    def __truediv__(self, name: str) -> StoragePath:
        if self.is_local:
            joined = str(Path(self.uri) / name)
            return StoragePath(filesystem=self.filesystem, path=joined, uri=joined)
        if any(character in name for character in "?#%"):
            raise ValueError(f"Name {name!r} under storage path {self} contains '?', '#' or '%', which cannot "
                             "appear in a folder name inside a URI. Choose a name without them.")
        head, question, query = self.uri.partition("?")
        uri = f"{head.rstrip('/')}/{name}{question}{query}"
        return StoragePath(filesystem=self.filesystem, path=f"{self.path.rstrip('/')}/{name}", uri=uri)

    def __str__(self) -> str:
        return mask_credentials(self.uri)

    def __repr__(self) -> str:
        return f"StoragePath({str(self)!r})"


def is_uri(text: str) -> bool:
    """Return whether ``text`` starts with a scheme of two or more characters and ``://`` (``C:\\`` is a path)."""
    return bool(_URI_PATTERN.match(text))


def mask_credentials(uri: str) -> str:
    """Replace the user part of ``uri`` and the values of secret-looking query keys with ``***``.

    The rest of the URI is kept character for character, so the result still shows what the user typed.
    """
    if not is_uri(uri):
        return uri
    scheme, rest = uri.split("://", 1)
    userinfo, authority_rest = _split_userinfo(rest)
    if userinfo is not None:
        rest = f"{MASK}@{authority_rest}"
    head, question, query = rest.partition("?")
    if question:
        query = "&".join(_mask_query_pair(pair) for pair in query.split("&"))
    return f"{scheme}://{head}{question}{query}"


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """Split ``user:password@host/path?query`` (a URI after ``://``) into the user part and the remainder."""
    authority_end = min([index for index in (rest.find(c) for c in "/?#") if index >= 0], default=len(rest))
    authority = rest[:authority_end]
    if "@" not in authority:
        return None, rest
    userinfo, host = authority.rsplit("@", 1)
    return userinfo, host + rest[authority_end:]


def _is_secret_query_key(key: str) -> bool:
    return key not in _PUBLIC_QUERY_KEYS and bool(_SECRET_QUERY_KEY.search(key))


def _mask_query_pair(pair: str) -> str:
    key, separator, _ = pair.partition("=")
    return f"{key}={MASK}" if separator and _is_secret_query_key(key) else pair


def _secrets_of(uri: str) -> list[str]:
    """Return the credential strings inside ``uri``, raw and percent-decoded, longest first."""
    if not is_uri(uri):
        return []
    rest = uri.split("://", 1)[1]
    userinfo, _ = _split_userinfo(rest)
    found = [userinfo, *userinfo.split(":")] if userinfo else []
    for pair in rest.partition("?")[2].split("&"):
        key, _, value = pair.partition("=")
        if value and _is_secret_query_key(key):
            found.append(value)
    found += [urllib.parse.unquote(secret) for secret in found]
    # Masking a very short value would garble the message (a secret "S" inside "S3") and hide little.
    return sorted({secret for secret in found if len(secret) >= _MIN_MASKED_CHARS}, key=len, reverse=True)


def _error_detail(error: BaseException, uri: str) -> str:
    """Return the first line of ``error``, shortened, with the credentials of ``uri`` masked."""
    lines = str(error).strip().splitlines()
    detail = lines[0].strip() if lines else type(error).__name__
    for secret in _secrets_of(uri):
        detail = detail.replace(secret, MASK)
    return detail if len(detail) <= _MAX_DETAIL_CHARS else detail[:_MAX_DETAIL_CHARS] + "..."


def _credentials_hint(scheme: str) -> str:
    if scheme == "s3":
        return ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of the driver "
                "and of every Ray node")
    if scheme in ("gs", "gcs"):
        return ("set GOOGLE_APPLICATION_CREDENTIALS in the environment of the driver and of every Ray node, or add "
                f"{GCS_ANONYMOUS_QUERY_KEY}=true for a public bucket or an emulator")
    if scheme in ("abfs", "abfss"):
        return (f"write the account key into the URI (abfs://ACCOUNT:KEY@...) or set {AZURE_KEY_VARIABLE}, or select "
                "another credential with the credential_kind, client_id or SAS token query keys")
    return "give the driver and every Ray node credentials for this storage"


def _bucket_of(location: StoragePath) -> str:
    return location.path.strip("/").split("/", 1)[0]


@contextlib.contextmanager
def _storage_errors(location: StoragePath, action: str) -> Iterator[None]:
    """Turn pyarrow's errors while doing ``action`` on ``location`` into one-line errors with the fix."""
    try:
        yield
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Storage path {location}: not found while {action} "
                                f"({_error_detail(error, location.uri)}).") from error
    except OSError as error:
        raise _classified_error(location, action, error) from error


def _classified_error(location: StoragePath, action: str, error: OSError) -> OSError:
    detail = _error_detail(error, location.uri)
    text = str(error)
    if any(marker in text for marker in _MISSING_BUCKET_MARKERS):
        word = _bucket_word(location)
        return FileNotFoundError(f"Storage path {location}: {word} '{_bucket_of(location)}' does not exist "
                                 f"({detail}). Create it first, or correct the {word} name.")
    if isinstance(error, PermissionError) and location.filesystem.type_name == "local":
        return PermissionError(f"Storage path {location}: permission denied while {action} ({detail}). Check the "
                               "permissions of the folder, or choose one that this user can write to.")
    if isinstance(error, PermissionError) or any(marker in text for marker in _ACCESS_MARKERS):
        return PermissionError(f"Storage path {location}: access denied while {action} ({detail}). The credentials "
                               f"are missing, invalid or lack permission: {_credentials_hint(location.scheme)}.")
    if any(marker in text for marker in _CONNECTION_MARKERS):
        return StorageError(f"Storage path {location}: cannot connect to the storage endpoint while {action} "
                            f"({detail}). Check the host and port in endpoint_override, that the server is running "
                            "and reachable from this machine, and add scheme=http for a server without TLS.")
    return StorageError(f"Storage path {location}: {action} failed ({detail}). Check the storage path and that "
                        "the storage service works.")


def resolve_storage_path(value: str | os.PathLike) -> StoragePath:
    """Resolve a plain path (made absolute, ``~`` expanded) or a ``pyarrow.fs`` URI into a :class:`StoragePath`.

    Raises:
        ValueError: the URI is invalid, has an unknown scheme or query key, or names no bucket.
        StorageError: pyarrow cannot open the filesystem (e.g. ``hdfs://`` without Java).
    """
    text = os.fspath(value)
    if not is_uri(text):
        path = str(Path(text).expanduser().resolve())
        return StoragePath(filesystem=pafs.LocalFileSystem(), path=path, uri=path)

    masked = mask_credentials(text)
    scheme = text.split("://", 1)[0].lower()
    pyarrow_uri, anonymous = _split_gcs_anonymous(text, masked) if scheme in ("gs", "gcs") else (text, False)
    pyarrow_uri, account_key = _split_azure_key(pyarrow_uri) if scheme in ("abfs", "abfss") else (pyarrow_uri, None)
    try:
        filesystem, path = pafs.FileSystem.from_uri(pyarrow_uri)
    except ValueError as error:  # pyarrow.ArrowInvalid: unknown scheme, unknown query key, syntax error
        raise ValueError(
            f"Invalid storage path {masked}: {_error_detail(error, text)}. Use a local folder or a URI that "
            "pyarrow.fs reads, such as s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, abfs://ACCOUNT@CONTAINER/PREFIX or "
            "file:///ABSOLUTE/PATH; for an S3-compatible server add ?endpoint_override=HOST:PORT&scheme=http."
        ) from error
    except OSError as error:
        raise StorageError(f"Storage path {masked}: pyarrow cannot open this filesystem "
                           f"({_error_detail(error, text)}).") from error

    if anonymous:
        filesystem = _anonymous_gcs_filesystem(filesystem)
    if filesystem.type_name == "abfs":
        filesystem = _azure_filesystem(filesystem, pyarrow_uri, account_key, masked)
    location = StoragePath(filesystem=filesystem, path=path.rstrip("/") or path, uri=text)
    if filesystem.type_name in BUCKET_FILESYSTEMS and not _bucket_of(location):
        raise ValueError(f"Invalid storage path {masked}: it names no {_bucket_word(location)}. Write it as "
                         f"{_uri_template(location.scheme)}.")
    return location


def _bucket_word(location: StoragePath) -> str:
    return "container" if location.filesystem.type_name == "abfs" else "bucket"


def _uri_template(scheme: str) -> str:
    if scheme in ("abfs", "abfss"):
        return f"{scheme}://ACCOUNT@CONTAINER/PREFIX or {scheme}://ACCOUNT@HOST:PORT/CONTAINER/PREFIX"
    return f"{scheme}://BUCKET/PREFIX"


def _query_pairs(uri: str) -> list[tuple[str, str]]:
    query = uri.partition("?")[2]
    return [(key, value) for key, _, value in (pair.partition("=") for pair in query.split("&") if pair)]


def _split_gcs_anonymous(uri: str, masked: str) -> tuple[str, bool]:
    """Remove the query key ``anonymous`` from a gs:// URI; return the URI for pyarrow and the key's value."""
    head, _, query = uri.partition("?")
    passed_on, anonymous = [], False
    for pair in query.split("&") if query else []:
        key, _, value = pair.partition("=")
        if key != GCS_ANONYMOUS_QUERY_KEY:
            passed_on.append(pair)
        elif value.lower() in _TRUE_TEXTS + _FALSE_TEXTS:
            anonymous = value.lower() in _TRUE_TEXTS
        else:
            raise ValueError(f"Invalid storage path {masked}: {GCS_ANONYMOUS_QUERY_KEY}={value!r} is not a boolean. "
                             f"Write {GCS_ANONYMOUS_QUERY_KEY}=true or {GCS_ANONYMOUS_QUERY_KEY}=false.")
    return (f"{head}?{'&'.join(passed_on)}" if passed_on else head), anonymous


def _anonymous_gcs_filesystem(filesystem: pafs.FileSystem) -> pafs.GcsFileSystem:
    """Return a GCS filesystem with the options of ``filesystem`` and anonymous access."""
    # The keyword arguments that pyarrow pickles the filesystem with are those of its constructor.
    options = filesystem.__reduce__()[1][0]
    return pafs.GcsFileSystem(anonymous=True, scheme=options["scheme"] or None,
                              endpoint_override=options["endpoint_override"] or None,
                              retry_time_limit=options["retry_time_limit"])


def _split_azure_key(uri: str) -> tuple[str, str | None]:
    """Remove the password from the user part of an abfs:// URI; return the URI and the decoded account key."""
    scheme, rest = uri.split("://", 1)
    userinfo, authority_rest = _split_userinfo(rest)
    if userinfo is None or ":" not in userinfo:
        return uri, None
    user, key = userinfo.split(":", 1)
    without_key = f"{scheme}://{user}@{authority_rest}" if user else f"{scheme}://{authority_rest}"
    return without_key, urllib.parse.unquote(key) or None


def _azure_filesystem(filesystem: pafs.FileSystem, uri: str, account_key: str | None,
                      masked: str) -> pafs.FileSystem:
    """Give ``filesystem`` the account key of the URI or of ``AZURE_STORAGE_KEY``, where no other credential is set.

    Raises:
        ValueError: the URI uses plain HTTP with the default credential, which would abort the process.
    """
    selects_credential = any(key in _AZURE_CREDENTIAL_QUERY_KEYS for key, _ in _query_pairs(uri))
    if account_key is None and not selects_credential:
        account_key = os.environ.get(AZURE_KEY_VARIABLE) or None
    options = filesystem.__reduce__()[1][0]
    if account_key is None:
        # The Azure SDK in pyarrow 26 throws an uncaught C++ exception, which aborts Python, when the default
        # credential (a bearer token) meets an http:// endpoint, so this is rejected before any request.
        if not selects_credential and options["account_name"] and options["blob_storage_scheme"] == "http":
            raise ValueError(
                f"Storage path {masked}: enable_tls=false needs an account key or another credential, because the "
                "Azure SDK sends no bearer token over plain HTTP. Write the key into the URI "
                f"(abfs://ACCOUNT:KEY@HOST:PORT/CONTAINER/PREFIX, the key percent-encoded) or set {AZURE_KEY_VARIABLE}.")
        return filesystem
    if selects_credential:
        raise ValueError(f"Storage path {masked}: it gives an account key and also selects another credential in "
                         "its query. Remove one of them.")
    return pafs.AzureFileSystem(
        account_name=options["account_name"], account_key=account_key,
        blob_storage_authority=options["blob_storage_authority"] or None,
        dfs_storage_authority=options["dfs_storage_authority"] or None,
        blob_storage_scheme=options["blob_storage_scheme"] or None,
        dfs_storage_scheme=options["dfs_storage_scheme"] or None)


def check_storage_reachable(location: StoragePath) -> None:
    """Check that the bucket of ``location`` exists and responds; local folders and ``file://`` always pass.

    Raises:
        FileNotFoundError: the bucket does not exist (lesiontune does not create buckets).
        PermissionError: the credentials are missing or rejected.
        StorageError: the endpoint cannot be reached, or the request failed otherwise.
    """
    if location.filesystem.type_name not in BUCKET_FILESYSTEMS:
        return
    bucket, word = _bucket_of(location), _bucket_word(location)
    with _storage_errors(location, f"checking {word} '{bucket}'"):
        info = location.filesystem.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"Storage path {location}: {word} '{bucket}' does not exist. Create it first, "
                                f"or correct the {word} name.")


def path_exists(location: StoragePath) -> bool:
    """Return whether a file or folder exists at ``location``."""
    with _storage_errors(location, "checking whether it exists"):
        return location.filesystem.get_file_info(location.path).type != pafs.FileType.NotFound


def list_names(folder: StoragePath) -> list[str]:
    """Return the names of the files and folders directly inside ``folder``; ``[]`` when it does not exist."""
    # pyarrow 26's GcsFileSystem lists a folder that exists only as the prefix of its objects (no folder
    # marker object) in a recursive listing but not in a flat one, so GCS folders are listed recursively.
    recursive = folder.filesystem.type_name == "gcs"
    selector = pafs.FileSelector(folder.path, recursive=recursive, allow_not_found=True)
    with _storage_errors(folder, "listing the folder"):
        infos = folder.filesystem.get_file_info(selector)
    root = folder.path.rstrip("/")
    return sorted({posixpath.relpath(info.path, root).split("/", 1)[0] for info in infos})


def read_bytes(location: StoragePath) -> bytes:
    """Return the content of the file at ``location``."""
    with _storage_errors(location, "reading the file"):
        with location.filesystem.open_input_stream(location.path) as stream:
            return stream.readall()


def read_text(location: StoragePath) -> str:
    """Return the content of the UTF-8 text file at ``location``."""
    return read_bytes(location).decode("utf-8")


def write_bytes(location: StoragePath, data: bytes) -> None:
    """Replace the file at ``location`` with ``data``, so that a reader sees the old or the new file, never a part.

    A local file is written beside the target and renamed over it. An object store shows an object only once
    its upload completes, so the object is written in place.
    """
    filesystem = location.filesystem
    with _storage_errors(location, "writing the file"):
        if filesystem.type_name != "local":
            with filesystem.open_output_stream(location.path) as stream:
                stream.write(data)
            return

        parent = posixpath.dirname(location.path)
        filesystem.create_dir(parent, recursive=True)
        temporary = posixpath.join(parent, f".{posixpath.basename(location.path)}.{uuid.uuid4().hex}.tmp")
        try:
            with filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            filesystem.move(temporary, location.path)
        except BaseException:
            with contextlib.suppress(OSError):
                filesystem.delete_file(temporary)
            raise


def write_text(location: StoragePath, text: str) -> None:
    """Replace the file at ``location`` with ``text`` in UTF-8 (see :func:`write_bytes`)."""
    write_bytes(location, text.encode("utf-8"))


def upload_files(source: Path, folder: StoragePath, names: Iterable[str]) -> None:
    """Copy the files ``names`` of the local folder ``source`` into ``folder``, each replaced whole."""
    for name in names:
        write_bytes(folder / name, (source / name).read_bytes())


def is_outside_checkpoints(relative: str) -> bool:
    """Return whether the path ``relative`` (to a run folder, with ``/``) is in no ``checkpoint_*`` folder."""
    return not any(folder.startswith(CHECKPOINT_FOLDER_PREFIX) for folder in relative.split("/")[:-1])


def download_run_files(run: StoragePath, destination: Path, *,
                       include: Callable[[str], bool] = is_outside_checkpoints) -> list[str]:
    """Copy the files of the run folder ``run`` for which ``include(relative path)`` is true into ``destination``.

    By default the files in ``checkpoint_*`` folders stay behind. What is left is small: Tune's experiment
    state, each trial's ``params.json``, ``result.json`` and ``error.txt``, and the files the driver wrote.
    Each copy gets the modification time of its source where the filesystem reports one, so that file
    times compare as they do in ``run``. Returns the copied paths, relative to ``run``, with ``/``.
    """
    with _storage_errors(run, "listing the run folder"):
        infos = run.filesystem.get_file_info(pafs.FileSelector(run.path, recursive=True, allow_not_found=True))

    copied = []
    root = run.path.rstrip("/")
    for info in infos:
        relative = posixpath.relpath(info.path, root)
        if info.type != pafs.FileType.File or not include(relative):
            continue
        target = destination.joinpath(*relative.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_read_fs_path(run, info.path))
        if info.mtime is not None:
            modified = info.mtime.timestamp()
            os.utime(target, (modified, modified))
        copied.append(relative)
    logger.debug("Copied %d files of %s into %s", len(copied), run, destination)
    return copied


def _read_fs_path(run: StoragePath, fs_path: str) -> bytes:
    with _storage_errors(run, f"reading {fs_path}"):
        with run.filesystem.open_input_stream(fs_path) as stream:
            return stream.readall()
