"""``lesiontune submit``: the upload that Ray would make, the size check, and the ``ray job submit`` command."""

from __future__ import annotations

import logging
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from search.cli import main
from search.submit import (DEFAULT_MAX_UPLOAD_BYTES, MIB, RAY_JOB_UPLOAD_LIMIT_BYTES, UploadTooLargeError,
                           check_upload_size, find_ray_cli, measure_upload, read_runtime_env_excludes)

REPO = Path(__file__).resolve().parents[2]
RAY_VARIABLES = ("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES")
FAKE_RAY = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_RAY_ARGV"
exit "${FAKE_RAY_STATUS:-0}"
"""


@pytest.fixture(autouse=True)
def _ray_defaults(monkeypatch):
    """Remove the developer's variables that change which files Ray uploads."""
    for name in RAY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _write(path: Path, size_bytes: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size_bytes)
    return path


def _sparse(path: Path, size_bytes: int) -> Path:
    """Create a file of ``size_bytes`` bytes that takes almost no disk space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size_bytes)
    return path


def _runtime_env(tmp_path: Path, *excludes: str) -> Path:
    path = tmp_path / "runtime_env.yaml"
    path.write_text("excludes:\n" + "".join(f"  - \"{pattern}\"\n" for pattern in excludes) if excludes else "{}\n")
    return path


def _uploaded(working_dir: Path, **kwargs) -> set[str]:
    return {entry.path for entry in measure_upload(working_dir, **kwargs).files}


@pytest.fixture
def project(tmp_path) -> Path:
    """A working directory with code, nested folders, run output and version control."""
    root = tmp_path / "project"
    _write(root / "search" / "driver.py", 100)
    _write(root / "data" / "images" / "a.jpg", 1000)
    _write(root / "data" / "images" / "nested" / "b.jpg", 2000)
    _write(root / "data" / "metadata.csv", 50)
    _write(root / "lesiontune_runs" / "run" / "trials.parquet", 300)
    _write(root / ".git" / "objects" / "pack", 400)
    _write(root / "venv" / "bin" / "python", 5)
    _write(root / "search" / "__pycache__" / "driver.cpython-311.pyc", 70)
    return root


@pytest.fixture
def fake_ray(tmp_path, monkeypatch) -> Path:
    """Put a ``ray`` script beside a fake interpreter. It writes its arguments, one a line, to the file returned."""
    bin_dir = tmp_path / "venv" / "bin"
    script = _write(bin_dir / "ray")
    script.write_text(FAKE_RAY)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    argv_file = tmp_path / "ray-argv.txt"
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("FAKE_RAY_ARGV", str(argv_file))
    return argv_file


def test_measure_upload_skips_ray_default_excludes(project):
    uploaded = _uploaded(project)

    assert "search/driver.py" in uploaded
    assert "data/images/nested/b.jpg" in uploaded
    assert not any(path.startswith(".git/") for path in uploaded)
    assert not any(path.startswith("venv/") for path in uploaded)
    assert not any("__pycache__" in path for path in uploaded)


def test_measure_upload_runtime_env_excludes(project):
    uploaded = _uploaded(project, excludes=["/lesiontune_runs/", "*.jpg"])

    assert uploaded == {"search/driver.py", "data/metadata.csv"}


def test_measure_upload_anchored_pattern_only_at_root(project):
    _write(project / "search" / "data" / "keep.py")

    uploaded = _uploaded(project, excludes=["/data/"])

    assert "search/data/keep.py" in uploaded
    assert not any(path.startswith("data/") for path in uploaded)


def test_measure_upload_nested_gitignore(project):
    (project / ".gitignore").write_text("/lesiontune_runs/\n")
    (project / "data" / ".gitignore").write_text("images/\n")

    uploaded = _uploaded(project)

    assert "data/metadata.csv" in uploaded
    assert "data/.gitignore" in uploaded
    assert not any(path.startswith(("data/images/", "lesiontune_runs/")) for path in uploaded)


def test_measure_upload_gitignore_disabled(project, monkeypatch):
    (project / ".gitignore").write_text("/lesiontune_runs/\n")
    (project / ".rayignore").write_text("*.csv\n")
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")

    upload = measure_upload(project)
    uploaded = {entry.path for entry in upload.files}

    assert not upload.include_gitignore
    assert "lesiontune_runs/run/trials.parquet" in uploaded
    assert "data/metadata.csv" not in uploaded


def test_measure_upload_counts_empty_folders(project):
    (project / "empty" / "inner").mkdir(parents=True)

    upload = measure_upload(project)

    assert upload.empty_dirs == ("empty/inner",)


def test_measure_upload_matches_ray_package(project, tmp_path):
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    (project / ".gitignore").write_text("/lesiontune_runs/\n")
    (project / "empty").mkdir()
    _write(project / "data" / "ñandú.csv", 33)
    excludes = ["*.jpg"]
    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True,
                   excludes=[*ray_constants.get_runtime_env_default_excludes(), *excludes])

    upload = measure_upload(project, excludes=excludes)

    with zipfile.ZipFile(package) as archive:
        packed_files = {name for name in archive.namelist() if not name.endswith("/")}
    assert packed_files == {entry.path for entry in upload.files}
    assert upload.package_bytes == package.stat().st_size


def test_measure_upload_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match=r"working directory .*absent is not an existing folder"):
        measure_upload(tmp_path / "absent")


def test_measure_upload_repository():
    upload = measure_upload(REPO, excludes=read_runtime_env_excludes(REPO / "runtime_env.yaml"))
    uploaded = {entry.path for entry in upload.files}

    assert "search/driver.py" in uploaded
    assert "runtime_env.yaml" in uploaded
    assert not any(path.startswith(("lesiontune_runs/", ".git/")) for path in uploaded)


def test_read_runtime_env_excludes_invalid(tmp_path):
    path = tmp_path / "runtime_env.yaml"
    path.write_text("excludes: /data/\n")

    with pytest.raises(ValueError, match=r"invalid 'excludes' in .*runtime_env.yaml: '/data/'\. Write a list"):
        read_runtime_env_excludes(path)


def test_read_runtime_env_excludes_not_mapping(tmp_path):
    path = tmp_path / "runtime_env.yaml"
    path.write_text("- /data/\n")

    with pytest.raises(ValueError, match="must contain a YAML mapping"):
        read_runtime_env_excludes(path)


def test_read_runtime_env_excludes_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"runtime environment file .*absent.yaml not found"):
        read_runtime_env_excludes(tmp_path / "absent.yaml")


def test_check_upload_size_too_large(project, tmp_path):
    _sparse(project / "data" / "cache" / "images.npy", 95 * MIB)
    runtime_env = _runtime_env(tmp_path, "/lesiontune_runs/")

    with pytest.raises(UploadTooLargeError) as raised:
        check_upload_size(project, runtime_env=runtime_env)

    message = str(raised.value)
    assert message.startswith(f"working directory {project} would upload 95.0 MiB in 5 files, more than the "
                              "limit of 90.0 MiB (--max-upload-mib)")
    assert "rejects uploads over 100.0 MiB" in message
    assert "95.0 MiB  data/ (folder, 4 files)" in message
    assert "95.0 MiB  data/cache/images.npy" in message
    assert f"add the large paths to 'excludes' in {runtime_env}" in message
    assert 'e.g. "/data/"' in message
    assert "--data, --cache-dir and --weights" in message


def test_check_upload_size_excluded_big_file(project, tmp_path, caplog):
    _sparse(project / "lesiontune_runs" / "run" / "checkpoint.bin", 200 * MIB)
    runtime_env = _runtime_env(tmp_path, "/lesiontune_runs/")

    with caplog.at_level(logging.WARNING, logger="search.submit"):
        upload = check_upload_size(project, runtime_env=runtime_env)

    assert upload.total_bytes == 100 + 1000 + 2000 + 50
    assert not caplog.records


def test_check_upload_size_gitignored_big_file(project):
    _sparse(project / "lesiontune_runs" / "run" / "checkpoint.bin", 200 * MIB)
    (project / ".gitignore").write_text("/lesiontune_runs/\n")

    upload = check_upload_size(project)

    assert upload.package_bytes < MIB


def test_check_upload_size_warning(project, caplog):
    _sparse(project / "weights" / "backbone.weights.h5", 30 * MIB)

    with caplog.at_level(logging.WARNING, logger="search.submit"):
        upload = check_upload_size(project)

    assert upload.package_bytes > 30 * MIB
    assert len(caplog.records) == 1
    assert "above 25.0 MiB" in caplog.records[0].getMessage()
    assert "weights/ (30.0 MiB)" in caplog.records[0].getMessage()


def test_check_upload_size_custom_limit(project):
    with pytest.raises(UploadTooLargeError, match=r"more than the limit of 1\.0 KiB"):
        check_upload_size(project, max_bytes=1024)


@pytest.mark.parametrize("max_bytes", [0, RAY_JOB_UPLOAD_LIMIT_BYTES + 1])
def test_check_upload_size_limit_out_of_range(project, max_bytes):
    with pytest.raises(ValueError, match=r"invalid maximum upload size .* at most 100 MiB"):
        check_upload_size(project, max_bytes=max_bytes)


def test_upload_limit_matches_ray():
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    assert RAY_JOB_UPLOAD_LIMIT_BYTES == ray_constants.DASHBOARD_CLIENT_MAX_SIZE
    assert RAY_JOB_UPLOAD_LIMIT_BYTES <= GCS_STORAGE_MAX_SIZE
    assert DEFAULT_MAX_UPLOAD_BYTES < RAY_JOB_UPLOAD_LIMIT_BYTES


def test_find_ray_cli_beside_python(fake_ray):
    assert find_ray_cli() == str(Path(sys.executable).parent / "ray")


def test_find_ray_cli_falls_back_to_path(fake_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "other" / "python"))
    monkeypatch.setenv("PATH", str(fake_ray.parent / "venv" / "bin"))

    assert find_ray_cli() == str(fake_ray.parent / "venv" / "bin" / "ray")


def test_find_ray_cli_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(FileNotFoundError, match=r"ray command was not found .* pip install 'ray\[default\]"):
        find_ray_cli()


def test_submit_runs_ray_job_submit(project, tmp_path, fake_ray, capsys):
    runtime_env = _runtime_env(tmp_path, "/lesiontune_runs/")

    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(runtime_env),
                   "--address", "http://127.0.0.1:8265", "--submission-id", "isic-01", "--no-wait", "--",
                   "--data", "/shared/isic", "--num-samples", "2", "--address", "auto"])

    assert status == 0
    assert fake_ray.read_text().splitlines() == [
        "job", "submit", "--working-dir", str(project), "--runtime-env", str(runtime_env),
        "--address", "http://127.0.0.1:8265", "--submission-id", "isic-01", "--no-wait", "--",
        "python", "-m", "search", "--data", "/shared/isic", "--num-samples", "2", "--address", "auto",
    ]
    out = capsys.readouterr().out
    assert f"Upload: 3.5 KiB in 4 files from {project} (limit 90.0 MiB)" in out
    assert "Running: " in out


def test_submit_default_options(project, tmp_path, fake_ray, monkeypatch):
    _runtime_env(project)
    monkeypatch.chdir(project)

    status = main(["submit"])

    assert status == 0
    assert fake_ray.read_text().splitlines() == [
        "job", "submit", "--working-dir", ".", "--runtime-env", "runtime_env.yaml", "--", "python", "-m", "search",
    ]


def test_submit_returns_ray_exit_status(project, tmp_path, fake_ray, monkeypatch):
    monkeypatch.setenv("FAKE_RAY_STATUS", "3")

    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path)),
                   "--", "--num-samples", "2"])

    assert status == 3
    assert fake_ray.is_file()


def test_submit_too_large_skips_ray(project, tmp_path, fake_ray, capsys):
    _sparse(project / "data" / "cache" / "images.npy", 95 * MIB)

    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path))])

    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"lesiontune: error: working directory {project} would upload 95.0 MiB")
    assert "Traceback" not in err
    assert not fake_ray.exists()


def test_submit_max_upload_mib(project, tmp_path, fake_ray, capsys):
    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path)),
                   "--max-upload-mib", "0.001"])

    assert status == 2
    assert "more than the limit of 1.0 KiB (--max-upload-mib)" in capsys.readouterr().err
    assert not fake_ray.exists()


def test_submit_max_upload_above_ray(project, tmp_path, fake_ray, capsys):
    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path)),
                   "--max-upload-mib", "150"])

    assert status == 2
    assert "invalid maximum upload size 150 MiB (--max-upload-mib)" in capsys.readouterr().err
    assert not fake_ray.exists()


def test_submit_max_upload_not_finite(project, tmp_path, fake_ray, capsys):
    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path)),
                   "--max-upload-mib", "inf"])

    assert status == 2
    assert "invalid --max-upload-mib inf. Pass a number of MiB" in capsys.readouterr().err
    assert not fake_ray.exists()


def test_submit_check_only_does_not_submit(project, tmp_path, fake_ray, capsys):
    status = main(["submit", "--check-only", "--working-dir", str(project),
                   "--runtime-env", str(_runtime_env(tmp_path, "/lesiontune_runs/"))])

    out = capsys.readouterr().out
    assert status == 0
    assert not fake_ray.exists()
    assert "Upload: 3.5 KiB in 4 files" in out
    assert "3.0 KiB  data/ (folder, 3 files)" in out
    assert "2.0 KiB  data/images/nested/b.jpg" in out


def test_submit_unknown_search_option(project, tmp_path, fake_ray, capsys):
    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path)),
                   "--", "--num-trials", "3"])

    assert status == 2
    assert ("lesiontune: error: invalid search arguments after '--': unrecognized arguments: --num-trials 3"
            in capsys.readouterr().err)
    assert not fake_ray.exists()


def test_submit_missing_runtime_env(project, tmp_path, fake_ray, capsys):
    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(tmp_path / "absent.yaml")])

    assert status == 2
    assert "runtime environment file" in capsys.readouterr().err
    assert not fake_ray.exists()


def test_submit_ray_missing(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))

    status = main(["submit", "--working-dir", str(project), "--runtime-env", str(_runtime_env(tmp_path))])

    assert status == 2
    assert "the ray command was not found" in capsys.readouterr().err
