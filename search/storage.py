"""Run folders on a local disk or in object storage: the names of :mod:`data.storage`, kept here for the driver.

The code lives in ``data.storage`` because ``results`` reads run folders too and must not import ``search``.
"""

from data.storage import (StorageError, StoragePath, check_storage_reachable, download_run_files,
                          is_outside_checkpoints, is_uri, list_names, mask_credentials, path_exists, read_bytes,
                          read_text, resolve_storage_path, upload_files, write_bytes, write_text)

__all__ = ["StorageError", "StoragePath", "check_storage_reachable", "download_run_files", "is_outside_checkpoints",
           "is_uri", "list_names", "mask_credentials", "path_exists", "read_bytes", "read_text",
           "resolve_storage_path", "upload_files", "write_bytes", "write_text"]
