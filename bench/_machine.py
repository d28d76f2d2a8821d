"""Facts shared by the benchmark scripts: where the shared data sits and what machine ran them."""

import platform
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


def cpu_model_name() -> str:
    """Return the CPU model from /proc/cpuinfo, else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


HAM10000_FOLDER = SHARED_DATA / "ham10000"


def skip_without_ham10000() -> bool:
    """Print why the benchmark is skipped and return True when HAM10000 is not in the shared data folder."""
    if (HAM10000_FOLDER / "HAM10000_metadata.csv").is_file() and (HAM10000_FOLDER / "images").is_dir():
        return False
    print(f"skipped: HAM10000 not found at {HAM10000_FOLDER} (expected HAM10000_metadata.csv and images/). "
          "Place the shared data folder next to the repository.", file=sys.stderr)
    return True
