"""Run folders in object storage for ``lesiontune results``: fetch what a command reads, upload what it writes.

A run argument that is a URI (``s3://``, ``gs://``, ``abfs://``, ``file://``, as ``--storage-path`` takes them)
is copied into a local temporary folder named like the run, and the command reads that copy. Only the files
the command needs are copied: the tables commands take everything outside the ``checkpoint_*`` folders, the
report adds each checkpoint's ``state.json`` and ``validation_scores.npy``, and ``evaluate`` and
``export-model`` fetch ``model.keras`` only for the checkpoints they load. The files a command writes into the
run folder (``trials.parquet``, ``report.html``, the test evaluation) are uploaded back. Errors that name the
local copy are raised again with the masked URI in its place.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from data.storage import (CHECKPOINT_FOLDER_PREFIX, StoragePath, check_storage_reachable, download_run_files,
                          is_outside_checkpoints, is_uri, list_names, path_exists, read_bytes, resolve_storage_path,
                          write_bytes)
from results.analysis import MODEL_FILE, SCORES_FILE, STATE_FILE, Checkpoint
from results.export import CONFIG_FILE

__all__ = ["RunCopy", "staged_runs"]

logger = logging.getLogger(__name__)

# Files that a command reads from each checkpoint folder before it loads a model.
CHECKPOINT_METADATA_FILES = (STATE_FILE, SCORES_FILE)


@dataclass(frozen=True)
class RunCopy:
    """A run argument of a command: a local run folder or pattern, or the local copy of a run in object storage.

    Attributes:
        argument: the run argument for the ``results`` functions: the local folder or glob pattern as given,
            or the folder of the local copy.
        remote: the run folder in object storage, or None for a local argument.
    """

    argument: str
    remote: StoragePath | None = None

    @property
    def local(self) -> Path:
        return Path(self.argument)

    def display(self, path: str | Path) -> str:
        """Return ``path``, a path inside the local copy, as the user should see it: inside the remote run."""
        if self.remote is None:
            return str(path)
        relative = Path(path).relative_to(self.local).as_posix()
        return str(self.remote) if relative == "." else str(self._remote_child(relative))

    def upload(self, *names: str) -> None:
        """Copy the files ``names`` (relative to the run folder, with ``/``) of the local copy into the remote run."""
        if self.remote is None:
            return
        for name in names:
            source = self.local.joinpath(*name.split("/"))
            write_bytes(self._remote_child(name), source.read_bytes())
            logger.info("Uploaded %s to %s", name, self.remote)

    def fetch_model(self, checkpoint: Checkpoint) -> None:
        """Copy ``model.keras`` of ``checkpoint`` from the remote run into the local copy, unless it is there."""
        if self.remote is None or checkpoint.model_path.is_file():
            return
        relative = checkpoint.model_path.relative_to(self.local).as_posix()
        checkpoint.model_path.write_bytes(read_bytes(self._remote_child(relative)))
        logger.info("Fetched %s of %s", relative, self.remote)

    def _remote_child(self, relative: str) -> StoragePath:
        location = self.remote
        for name in relative.split("/"):
            location = location / name
        return location


def _is_checkpoint_metadata(relative: str) -> bool:
    folders, name = relative.split("/")[:-1], posixpath.basename(relative)
    in_checkpoint = any(folder.startswith(CHECKPOINT_FOLDER_PREFIX) for folder in folders)
    return in_checkpoint and name in CHECKPOINT_METADATA_FILES


def _with_checkpoint_metadata(relative: str) -> bool:
    return is_outside_checkpoints(relative) or _is_checkpoint_metadata(relative)


def _expand_remote_pattern(pattern: str) -> list[StoragePath]:
    """Expand a URI whose last folder name is a glob pattern (``s3://bucket/runs/*``) into run folders."""
    head, question, query = pattern.partition("?")
    parent_head, _, name_pattern = head.rstrip("/").rpartition("/")
    if glob.has_magic(parent_head):
        raise ValueError(f"Run pattern {resolve_storage_path(pattern)}: only the last folder name of a URI may "
                         "contain *, ? or [ ]. List the runs one by one, or put the pattern in the last name only.")
    parent = resolve_storage_path(f"{parent_head}{question}{query}")
    check_storage_reachable(parent)
    runs = [parent / name for name in list_names(parent) if fnmatch.fnmatchcase(name, name_pattern)]
    runs = [run for run in runs if path_exists(run / CONFIG_FILE)]
    if not runs:
        raise FileNotFoundError(f"No run folder matches {resolve_storage_path(pattern)}: a run folder contains "
                                f"{CONFIG_FILE}. Check the pattern, and quote it so that the shell does not "
                                "expand it first.")
    return runs


def _remote_runs(argument: str) -> list[StoragePath]:
    head = argument.partition("?")[0]
    if glob.has_magic(head.split("://", 1)[1]):
        return _expand_remote_pattern(argument)
    run = resolve_storage_path(argument)
    check_storage_reachable(run)
    if not path_exists(run / CONFIG_FILE):
        raise FileNotFoundError(f"{run} is not a lesiontune run folder: {CONFIG_FILE} not found. Pass the folder "
                                "that 'lesiontune search' printed (STORAGE_PATH/NAME).")
    return [run]


def _copy_run(run: StoragePath, workspace: Path, index: int, *, checkpoint_metadata: bool) -> RunCopy:
    # The copy's folder has the run's name, because tables and reports label a run by its folder name.
    name = run.path.rstrip("/").rsplit("/", 1)[-1]
    destination = workspace / str(index) / name
    include = _with_checkpoint_metadata if checkpoint_metadata else is_outside_checkpoints
    copied = download_run_files(run, destination, include=include)
    logger.info("Fetched %d files of %s", len(copied), run)
    return RunCopy(argument=str(destination), remote=run)


def _replace_in_message(error: Exception, copies: Sequence[RunCopy]) -> Exception | None:
    """Return ``error`` again with each local copy's folder replaced by its URI, or None when none appears."""
    message = str(error)
    for copy in copies:
        if copy.remote is not None:
            message = message.replace(str(copy.local), str(copy.remote))
    if message == str(error):
        return None
    try:
        return type(error)(message)
    except TypeError:  # an exception type whose constructor takes other arguments
        return None


@contextlib.contextmanager
def staged_runs(arguments: Sequence[str], *, checkpoint_metadata: bool = False) -> Iterator[list[RunCopy]]:
    """Copy the remote runs among ``arguments`` into a temporary folder, removed on exit, and yield the runs.

    Local folders and glob patterns are yielded unchanged, for the ``results`` functions to expand. A URI
    whose last folder name has ``*``, ``?`` or ``[ ]`` is expanded by listing its parent folder.

    Args:
        arguments: run folders, glob patterns or URIs, as the user gave them.
        checkpoint_metadata: also copy each checkpoint's ``state.json`` and ``validation_scores.npy``.

    Raises:
        ValueError: a URI is invalid.
        FileNotFoundError: the bucket, the run folder or its ``lesiontune_config.yaml`` is missing.
        PermissionError, data.storage.StorageError: the storage service rejected or failed a request.
    """
    with tempfile.TemporaryDirectory(prefix="lesiontune-results-") as workspace:
        copies: list[RunCopy] = []
        for argument in arguments:
            if not is_uri(argument):
                copies.append(RunCopy(argument=argument))
                continue
            for run in _remote_runs(argument):
                copies.append(_copy_run(run, Path(workspace), len(copies), checkpoint_metadata=checkpoint_metadata))
        try:
            yield copies
        except (ValueError, FileNotFoundError) as error:
            replaced = _replace_in_message(error, copies)
            if replaced is None:
                raise
            raise replaced from error
