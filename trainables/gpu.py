"""Read facts about this machine's GPUs with nvidia-smi.

This module imports no TensorFlow, so the search driver can read a GPU's memory without starting it.
"""

from __future__ import annotations

import logging
import os
import subprocess

__all__ = ["gpu_total_memory_mib"]

logger = logging.getLogger(__name__)


def gpu_total_memory_mib() -> int | None:
    """Return the total memory in MiB of the first GPU visible to this process, from nvidia-smi, or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        completed = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", visible],
            capture_output=True, text=True, timeout=30, check=True)
        return int(completed.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
        logger.warning("Failed to read the memory of GPU %s with nvidia-smi (%s).", visible, error)
        return None
