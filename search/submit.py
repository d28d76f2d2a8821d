"""Measure the working directory that ``ray job submit`` uploads, and build the command that submits a search.

``ray job submit --working-dir DIR`` zips DIR and sends the zip to the cluster's job server in one HTTP
request. Ray 2.60 skips the paths matched by its default excludes (``.git``, ``.venv``, ``venv``,
``__pycache__``), by the runtime environment's ``excludes`` and by the ``.gitignore`` and ``.rayignore``
files of every folder it walks. The job server rejects a request body over 100 MiB
(``DASHBOARD_CLIENT_MAX_SIZE`` in ``ray/_private/ray_constants.py``), which is smaller than the 512 MiB
that the GCS accepts for a package (``GCS_STORAGE_MAX_SIZE`` in ``ray/_private/runtime_env/packaging.py``).

:func:`measure_upload` walks the folder with Ray's own traversal and exclusion functions, so it selects the
same files that Ray packs, and :func:`check_upload_size` rejects an upload before Ray builds and sends it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_WARN_UPLOAD_BYTES", "MIB", "RAY_JOB_UPLOAD_LIMIT_BYTES", "UploadEntry",
           "UploadSize", "UploadTooLargeError", "check_upload_size", "find_ray_cli", "format_largest_entries",
           "format_size", "job_submit_command", "measure_upload", "read_runtime_env_excludes"]

logger = logging.getLogger(__name__)

MIB = 1024**2
# DASHBOARD_CLIENT_MAX_SIZE of Ray 2.60. Against a Ray 2.60 head, a package 16 bytes over it failed with
# "413: Maximum request body size 104857600 exceeded", and one 16 bytes under it was accepted.
RAY_JOB_UPLOAD_LIMIT_BYTES = 100 * MIB
# 10 MiB below Ray's limit, because files can grow between the check and the upload.
DEFAULT_MAX_UPLOAD_BYTES = 90 * MIB
# The code of lesiontune is under 1 MiB, so a package this large usually carries data, weights or run output.
# Ray also uploads it again whenever one of its files changes.
DEFAULT_WARN_UPLOAD_BYTES = 25 * MIB
LARGEST_ENTRIES_SHOWN = 8
IGNORE_GITIGNORE_VARIABLE = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"

# Sizes of the records that Python's zipfile writes for an entry stored without compression, which is how Ray
# 2.60 packs a working directory (ZipFile without a compression argument, in _zip_files).
_ZIP_LOCAL_HEADER_BYTES = 30
_ZIP_CENTRAL_HEADER_BYTES = 46
_ZIP_END_RECORD_BYTES = 22
_ZIP64_END_RECORDS_BYTES = 56 + 20


class UploadTooLargeError(ValueError):
    """The working directory would make a package larger than the allowed upload size."""


@dataclass(frozen=True)
class UploadEntry:
    """A file, or a folder summed over its files, that Ray would upload. ``path`` is relative, with ``/``."""

    path: str
    size_bytes: int
    files: int = 1


@dataclass(frozen=True)
class UploadSize:
    """The files and empty folders that Ray would pack from ``working_dir``, and the size of that zip."""

    working_dir: Path
    files: tuple[UploadEntry, ...]
    empty_dirs: tuple[str, ...]
    excludes: tuple[str, ...]
    include_gitignore: bool

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes in bytes."""
        return sum(entry.size_bytes for entry in self.files)

    @property
    def package_bytes(self) -> int:
        """Size in bytes of the zip that Ray sends: the file sizes plus the zip headers of every entry."""
        return _stored_zip_size([(entry.path, entry.size_bytes) for entry in self.files]
                                + [(f"{name}/", 0) for name in self.empty_dirs])

    def largest_files(self, count: int = LARGEST_ENTRIES_SHOWN) -> list[UploadEntry]:
        return sorted(self.files, key=lambda entry: (-entry.size_bytes, entry.path))[:count]

    def largest_top_level_entries(self, count: int = LARGEST_ENTRIES_SHOWN) -> list[UploadEntry]:
        """Return the files and folders directly inside the working directory, each folder summed over its files."""
        sizes: dict[str, int] = {}
        counts: dict[str, int] = {}
        for entry in self.files:
            head, separator, _ = entry.path.partition("/")
            name = head + separator
            sizes[name] = sizes.get(name, 0) + entry.size_bytes
            counts[name] = counts.get(name, 0) + 1
        entries = [UploadEntry(path=name, size_bytes=sizes[name], files=counts[name]) for name in sizes]
        return sorted(entries, key=lambda entry: (-entry.size_bytes, entry.path))[:count]


class _InfoAsDebug(logging.LoggerAdapter):
    """Log Ray's "Ignoring upload to cluster for these files" lines, one per ignore file, at DEBUG."""

    def info(self, msg, *args, **kwargs):
        self.debug(msg, *args, **kwargs)


def _stored_zip_size(entries: Sequence[tuple[str, int]]) -> int:
    """Return the size in bytes of a zip of uncompressed ``(name, size in bytes)`` entries, as zipfile writes it.

    Exact while each file is under 1.9 GiB and the archive under 2 GiB, which covers every size that the job
    server accepts. Beyond that, Python 3.11's zipfile adds ZIP64 fields of up to 48 bytes per entry, and 76 bytes
    of end records, that this sum leaves out.
    """
    total = 0
    for name, size_bytes in entries:
        name_bytes = len(name.encode("utf-8", "surrogateescape"))
        total += _ZIP_LOCAL_HEADER_BYTES + _ZIP_CENTRAL_HEADER_BYTES + 2 * name_bytes + size_bytes
    total += _ZIP_END_RECORD_BYTES
    if len(entries) > zipfile.ZIP_FILECOUNT_LIMIT:
        total += _ZIP64_END_RECORDS_BYTES
    return total


def read_runtime_env_excludes(runtime_env: str | os.PathLike) -> list[str]:
    """Read and validate the ``excludes`` patterns (gitignore syntax) of a runtime environment YAML file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a YAML mapping, or ``excludes`` is not a list of strings.
    """
    path = Path(runtime_env)
    if not path.is_file():
        raise FileNotFoundError(f"runtime environment file {path} not found. Pass an existing YAML file with "
                                "--runtime-env, e.g. the runtime_env.yaml at the root of the repository.")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"runtime environment file {path} is not valid YAML: {error}") from error
    if content is None:
        return []
    if not isinstance(content, dict):
        raise ValueError(f"runtime environment file {path} must contain a YAML mapping such as 'excludes: [...]', "
                         f"got a {type(content).__name__}")

    excludes = content.get("excludes") or []
    if not isinstance(excludes, list) or not all(isinstance(pattern, str) for pattern in excludes):
        raise ValueError(f"invalid 'excludes' in {path}: {excludes!r}. Write a list of gitignore patterns, "
                         "e.g. excludes: [\"/lesiontune_runs/\", \"*.npy\"]")
    if content.get("py_modules"):
        # NOTE: Ray uploads each local py_modules entry as a package of its own, and this check measures only
        # the working directory, so a py_modules folder over the job server's limit still fails at upload.
        logger.warning("%s sets py_modules, whose upload size is not checked (only the working directory's is)",
                       path)
    return excludes


def measure_upload(working_dir: str | os.PathLike, *, excludes: Sequence[str] = (),
                   include_gitignore: bool | None = None) -> UploadSize:
    """List the files and empty folders that Ray 2.60 would pack from ``working_dir``, with their sizes in bytes.

    Args:
        working_dir: the folder passed to ``ray job submit --working-dir``.
        excludes: the runtime environment's ``excludes``, gitignore patterns relative to ``working_dir``.
            Ray's default excludes are added in front, as Ray does, including an override from
            ``RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES``.
        include_gitignore: whether ``.gitignore`` files exclude paths too (``.rayignore`` files always do).
            Default: what Ray does, which is yes unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``.

    Raises:
        NotADirectoryError: ``working_dir`` is not an existing folder.
    """
    # NOTE: _dir_travel and _get_excludes are private functions of Ray 2.60. They are used so that the result
    # matches Ray's package, and tests/search/test_submit.py compares it with a package built by Ray itself.
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).absolute()
    if not root.is_dir():
        raise NotADirectoryError(f"working directory {working_dir} is not an existing folder. Pass the folder to "
                                 "upload with --working-dir, usually the root of the repository (.).")
    if include_gitignore is None:
        include_gitignore = os.environ.get(IGNORE_GITIGNORE_VARIABLE, "0") != "1"
    patterns = [*ray_constants.get_runtime_env_default_excludes(), *excludes]

    files: list[UploadEntry] = []
    empty_dirs: list[str] = []

    # The same test as the handler of Ray's _zip_files: it packs files and empty folders, and follows symbolic links.
    def collect(path: Path) -> None:
        if path.is_file():
            files.append(UploadEntry(path=path.relative_to(root).as_posix(), size_bytes=path.stat().st_size))
        elif path.is_dir() and next(path.iterdir(), None) is None:
            empty_dirs.append(path.relative_to(root).as_posix())

    _dir_travel(root, [_get_excludes(root, patterns)], collect, include_gitignore=include_gitignore,
                logger=_InfoAsDebug(logger, {}))
    return UploadSize(working_dir=root, files=tuple(files), empty_dirs=tuple(empty_dirs), excludes=tuple(patterns),
                      include_gitignore=include_gitignore)


def format_largest_entries(upload: UploadSize, count: int = LARGEST_ENTRIES_SHOWN) -> list[str]:
    """Return lines that name the largest top-level entries and the largest files of an upload."""
    lines = ["largest entries in the working directory:"]
    for entry in upload.largest_top_level_entries(count):
        kind = f"folder, {entry.files} files" if entry.path.endswith("/") else "file"
        lines.append(f"  {format_size(entry.size_bytes):>12}  {entry.path} ({kind})")
    lines.append("largest files:")
    for entry in upload.largest_files(count):
        lines.append(f"  {format_size(entry.size_bytes):>12}  {entry.path}")
    return lines


def format_size(num_bytes: int) -> str:
    """Return a size in bytes as bytes below 1 KiB, as KiB below 1 MiB, else as MiB with one decimal."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < MIB:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes / MIB:.1f} MiB"


def check_upload_size(working_dir: str | os.PathLike, *, runtime_env: str | os.PathLike | None = None,
                      max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, warn_bytes: int = DEFAULT_WARN_UPLOAD_BYTES,
                      include_gitignore: bool | None = None) -> UploadSize:
    """Measure the package that ``ray job submit`` would upload, and reject it when it is too large.

    Args:
        working_dir: the folder passed to ``ray job submit --working-dir``.
        runtime_env: the YAML file passed to ``--runtime-env``, whose ``excludes`` apply, or None for no file.
        max_bytes: the largest package size accepted, in bytes, from 1 to ``RAY_JOB_UPLOAD_LIMIT_BYTES``.
        warn_bytes: a package larger than this, in bytes, logs a warning but passes.
        include_gitignore: see :func:`measure_upload`.

    Returns:
        The measured upload.

    Raises:
        UploadTooLargeError: the package is larger than ``max_bytes``; the message lists its largest entries.
        ValueError: ``max_bytes`` is out of range, or the runtime environment file is invalid.
    """
    if not 0 < max_bytes <= RAY_JOB_UPLOAD_LIMIT_BYTES:
        raise ValueError(f"invalid maximum upload size {max_bytes / MIB:g} MiB (--max-upload-mib). It must be "
                         f"above 0 and at most {RAY_JOB_UPLOAD_LIMIT_BYTES // MIB} MiB, the largest working_dir "
                         "upload that the job server of Ray 2.60 accepts")
    excludes = read_runtime_env_excludes(runtime_env) if runtime_env is not None else []
    upload = measure_upload(working_dir, excludes=excludes, include_gitignore=include_gitignore)

    package_bytes = upload.package_bytes
    if package_bytes > max_bytes:
        raise UploadTooLargeError(_too_large_message(upload, runtime_env, max_bytes))
    if package_bytes > warn_bytes:
        logger.warning("The upload of %s is %s, above %s. The largest entries are %s. Excluding data, weights "
                       "and run folders in the runtime environment's excludes makes every submission faster.",
                       upload.working_dir, format_size(package_bytes), format_size(warn_bytes),
                       ", ".join(f"{entry.path} ({format_size(entry.size_bytes)})"
                                 for entry in upload.largest_top_level_entries(3)))
    return upload


def _too_large_message(upload: UploadSize, runtime_env: str | os.PathLike | None, max_bytes: int) -> str:
    env_name = str(runtime_env) if runtime_env is not None else "a runtime environment file (--runtime-env)"
    if upload.include_gitignore:
        applied = f"the excludes of {env_name}, Ray's default excludes, and the .gitignore and .rayignore files"
    else:
        applied = (f"the excludes of {env_name}, Ray's default excludes and the .rayignore files, but not the "
                   f".gitignore files, because {IGNORE_GITIGNORE_VARIABLE}=1 is set")
    biggest = upload.largest_top_level_entries(1)
    example = f"/{biggest[0].path}" if biggest else "/data/"
    lines = [
        f"working directory {upload.working_dir} would upload {format_size(upload.package_bytes)} in "
        f"{len(upload.files)} files, more than the limit of {format_size(max_bytes)} (--max-upload-mib). "
        f"The job server of Ray 2.60 rejects uploads over {format_size(RAY_JOB_UPLOAD_LIMIT_BYTES)}. "
        f"The count applies {applied}.",
        *format_largest_entries(upload),
        f"To upload less, add the large paths to 'excludes' in {env_name}, as gitignore patterns relative to the "
        f"working directory (e.g. \"{example}\"). Move data sets, image caches and weights to storage that the "
        "cluster reads, and pass their paths with --data, --cache-dir and --weights.",
    ]
    return "\n".join(lines)


def find_ray_cli() -> str:
    """Return the path of the ``ray`` command beside the running Python, or else the first one on PATH.

    Raises:
        FileNotFoundError: neither exists.
    """
    beside_python = Path(sys.executable).parent / "ray"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("ray")
    if on_path is None:
        raise FileNotFoundError(f"the ray command was not found in {beside_python.parent} or on PATH. Install it "
                                "in this environment with: pip install 'ray[default]==2.60.0'")
    return on_path


def job_submit_command(ray_cli: str, *, working_dir: str, runtime_env: str, search_args: Sequence[str],
                       address: str | None = None, submission_id: str | None = None,
                       no_wait: bool = False) -> list[str]:
    """Return the argv of ``ray job submit`` that runs ``python -m search SEARCH_ARGS`` as the job's entrypoint."""
    command = [ray_cli, "job", "submit", "--working-dir", working_dir, "--runtime-env", runtime_env]
    if address is not None:
        command += ["--address", address]
    if submission_id is not None:
        command += ["--submission-id", submission_id]
    if no_wait:
        command.append("--no-wait")
    return [*command, "--", "python", "-m", "search", *search_args]
