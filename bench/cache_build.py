"""Benchmark: build the resized-image cache versus decoding each image with Keras.

Makes large JPEGs (4000x3000 pixels, about 12 megapixels, by default) from a few ISIC
images in ``../shared/data/isic-cc0-550`` relative to the repository root, then times on
the same files:

- ``build_image_cache`` at 224 pixels with all cores (``workers=None``), from the call to
  the returned cache, so hashing, writing the index and starting the worker processes are
  included. Each repeat builds a new cache. The first build in the process is "cold":
  it also pays one-time costs such as first imports and the forkserver start when that
  start method is set. Later builds are "warm".
- the per-image baseline ``keras.utils.load_img(path, target_size=(224, 224))`` followed
  by ``keras.utils.img_to_array``, in one process, as a data loader without a cache does
  for every image in every epoch.

Also times ``build_image_cache`` with ``workers=1``, whose CPU seconds (``time.process_time``)
cover all its work. On a machine shared with other jobs the wall-clock figures depend on
their load, and CPU seconds per image depend on it less.

Library imports (pandas, Keras) happen before the clocks start. Prints a table, then as
the last line one JSON object with the figures. ``ratio`` is the cold all-cores build's
images/s divided by the baseline's median images/s, ``ratio_warm`` uses the median of the
warm builds, and ``ratio_cpu`` divides the baseline's CPU seconds by those of the
one-worker build.

Run from the repository root::

    python bench/cache_build.py --count 240
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _machine import SHARED_DATA, cpu_model_name
from data.cache import build_image_cache

SOURCE_FOLDER = SHARED_DATA / "isic-cc0-550"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_argument_group("generated JPEGs")
    sizes.add_argument("--count", type=int, default=240, help="JPEG files to time (default 240)")
    sizes.add_argument(
        "--sources", type=int, default=6,
        help="distinct ISIC images to upscale, which the files repeat in turn (default 6)",
    )
    sizes.add_argument("--width", type=int, default=4000, help="JPEG width in pixels (default 4000)")
    sizes.add_argument("--height", type=int, default=3000, help="JPEG height in pixels (default 3000)")
    sizes.add_argument("--quality", type=int, default=90, help="JPEG quality, 1 to 95 (default 90)")
    sizes.add_argument(
        "--noise", type=float, default=0.0,
        help="standard deviation of Gaussian noise added after upscaling, in 8-bit levels "
        "(default 0). Upscaled images are smoother than camera originals and so make "
        "smaller files. Noise raises the file size and the entropy-decoding work.",
    )
    timing = parser.add_argument_group("timing")
    timing.add_argument("--image-size", type=int, default=224, help="output side in pixels (default 224)")
    timing.add_argument(
        "--workers", type=int, default=None,
        help="cache workers (default: all cores, os.cpu_count())",
    )
    timing.add_argument(
        "--repeats", type=int, default=3,
        help="timed runs of each method, at least 2 (default 3)",
    )
    return parser.parse_args()


def make_large_jpegs(folder: Path, arguments: argparse.Namespace) -> list[str]:
    """Write ``count`` JPEGs upscaled from ``sources`` ISIC images and return their paths."""
    sources = sorted(SOURCE_FOLDER.glob("ISIC_*.jpg"))[: arguments.sources]
    rng = np.random.default_rng(0)
    encoded = []
    for source in sources:
        with Image.open(source) as image:
            large = image.convert("RGB").resize(
                (arguments.width, arguments.height), Image.Resampling.BICUBIC
            )
        if arguments.noise > 0:
            pixels = np.asarray(large, dtype=np.float32)
            pixels = pixels + rng.normal(0.0, arguments.noise, pixels.shape).astype(np.float32)
            large = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        path = folder / f"source_{source.stem}.jpg"
        large.save(path, quality=arguments.quality)
        encoded.append(path.read_bytes())

    # Files that repeat a source have identical bytes. Each file is still decoded in full.
    paths = []
    for number in range(arguments.count):
        path = folder / f"large_{number:04d}.jpg"
        path.write_bytes(encoded[number % len(encoded)])
        paths.append(str(path))
    return paths


def time_cache_build(
    paths: list[str], cache_root: Path, image_size: int, workers: int | None
) -> tuple[float, float]:
    """Build a new cache of ``paths`` under ``cache_root``.

    Returns:
        Wall-clock seconds, and CPU seconds of this process only (worker processes excluded).
    """
    ids = [Path(path).stem for path in paths]
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    cache = build_image_cache(
        paths, ids, image_size=image_size, cache_root=cache_root, workers=workers, progress=False,
    )
    seconds = (time.perf_counter() - wall_started, time.process_time() - cpu_started)
    if not cache.ok.all():
        raise RuntimeError(f"the cache skipped images: {cache.skipped.to_dict('records')}")
    return seconds


def time_keras_baseline(paths: list[str], image_size: int) -> tuple[float, float]:
    """Load ``paths`` one by one with Keras and return wall-clock and CPU seconds."""
    import keras

    wall_started, cpu_started = time.perf_counter(), time.process_time()
    arrays = [
        keras.utils.img_to_array(keras.utils.load_img(path, target_size=(image_size, image_size)))
        for path in paths
    ]
    seconds = (time.perf_counter() - wall_started, time.process_time() - cpu_started)
    if len(arrays) != len(paths):
        raise RuntimeError("the baseline did not load every image")
    return seconds


def import_libraries_untimed() -> None:
    # Imported inside a function: cache workers started with spawn or forkserver run this
    # script's top-level code again on CPython 3.12 and older, and should not import
    # TensorFlow there. With fork, the Linux default before Python 3.14, the workers
    # inherit these modules.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: F401
    import pandas  # noqa: F401


def main() -> int:
    arguments = parse_arguments()
    if arguments.repeats < 2:
        print(f"--repeats must be at least 2, got {arguments.repeats}", file=sys.stderr)
        return 2
    if not SOURCE_FOLDER.is_dir():
        print(f"skipped: ISIC images not found at {SOURCE_FOLDER}. "
              "Place the shared data folder next to the repository.", file=sys.stderr)
        return 0

    import_libraries_untimed()
    load_before = os.getloadavg()[0]
    work_folder = Path(tempfile.mkdtemp(prefix="lesiontune-bench-cache-"))
    try:
        image_folder = work_folder / "images"
        image_folder.mkdir()
        paths = make_large_jpegs(image_folder, arguments)
        mean_file_megabytes = float(np.mean([os.path.getsize(path) for path in paths])) / 1e6

        size = arguments.image_size
        all_cores = [
            time_cache_build(paths, work_folder / f"all_cores_{repeat}", size, arguments.workers)
            for repeat in range(arguments.repeats)
        ]
        one_worker = [
            time_cache_build(paths, work_folder / f"one_worker_{repeat}", size, 1)
            for repeat in range(arguments.repeats)
        ]
        baseline = [time_keras_baseline(paths, size) for _ in range(arguments.repeats)]
    finally:
        shutil.rmtree(work_folder, ignore_errors=True)
    load_after = os.getloadavg()[0]

    count = len(paths)
    workers = arguments.workers or os.cpu_count()
    cold_seconds = all_cores[0][0]
    warm_seconds = float(np.median([wall for wall, _ in all_cores[1:]]))
    one_worker_cpu = float(np.median([cpu for _, cpu in one_worker]))
    baseline_wall = float(np.median([wall for wall, _ in baseline]))
    baseline_cpu = float(np.median([cpu for _, cpu in baseline]))
    # (method, wall-clock seconds, CPU seconds or None where worker processes did the work)
    rows = [
        (f"build_image_cache, workers={workers}, cold", cold_seconds, None),
        (f"build_image_cache, workers={workers}, warm (median)", warm_seconds, None),
        ("build_image_cache, workers=1 (median)",
         float(np.median([wall for wall, _ in one_worker])), one_worker_cpu),
        ("keras load_img + img_to_array (median)", baseline_wall, baseline_cpu),
    ]

    print(f"{count} JPEGs of {arguments.width}x{arguments.height}, quality {arguments.quality}, "
          f"noise {arguments.noise}, mean {mean_file_megabytes:.2f} MB, to {size} px, "
          f"{arguments.repeats} runs of each method, 1-minute load average "
          f"{load_before:.1f} before and {load_after:.1f} after")
    print(f"{'method':<48} {'images':>6} {'seconds':>8} {'images/s':>9} {'CPU s':>6} {'img/CPU s':>9}")
    for method, wall, cpu in rows:
        cpu_columns = f"{cpu:>6.2f} {count / cpu:>9.1f}" if cpu is not None else f"{'-':>6} {'-':>9}"
        print(f"{method:<48} {count:>6} {wall:>8.2f} {count / wall:>9.1f} {cpu_columns}")
    print(json.dumps({
        "benchmark": "image_cache_build",
        "images": count,
        "source_pixels": [arguments.width, arguments.height],
        "jpeg_quality": arguments.quality,
        "noise": arguments.noise,
        "mean_file_megabytes": round(mean_file_megabytes, 3),
        "image_size": size,
        "workers": workers,
        "cpu": cpu_model_name(),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "repeats": arguments.repeats,
        "cache_seconds": round(cold_seconds, 3),
        "cache_images_per_s": round(count / cold_seconds, 1),
        "cache_warm_seconds": round(warm_seconds, 3),
        "cache_warm_images_per_s": round(count / warm_seconds, 1),
        "cache_one_worker_cpu_seconds": round(one_worker_cpu, 3),
        "baseline_seconds": round(baseline_wall, 3),
        "baseline_images_per_s": round(count / baseline_wall, 1),
        "baseline_cpu_seconds": round(baseline_cpu, 3),
        "ratio": round(baseline_wall / cold_seconds, 2),
        "ratio_warm": round(baseline_wall / warm_seconds, 2),
        "ratio_cpu": round(baseline_cpu / one_worker_cpu, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
