"""Benchmark: the tf.data input pipeline versus Keras ImageDataGenerator, and its cost to training.

Resizes the first images of ``../shared/data/isic-cc0-550`` (relative to the repository
root) to 224 pixels, writes them to a temporary folder as a uint8 ``.npy`` image cache
and as JPEG class folders, then times in one run:

- ``make_dataset`` over a read-only memmap of the cache, with ``build_augmentation(0.5)``,
  shuffled, batch 32, in images/s. For reference it also times the pipeline without
  augmentation, and with the baseline's augmentation rebuilt in Albumentations: flips,
  and a rotation in [-90, 90] degrees with replicated borders for every image;
- the Keras 2 style baseline ``ImageDataGenerator(horizontal_flip=True, vertical_flip=True,
  rotation_range=90).flow_from_directory(...)`` on the JPEG folders, which decodes each
  JPEG and augments in the consuming thread. Keras 3 (checked on 3.15) no longer has
  ``keras.preprocessing.image.ImageDataGenerator``, but its tf.keras compatibility module
  still exports the legacy class as ``tf.keras.preprocessing.image.ImageDataGenerator``,
  which this script uses;
- the median time of one training step of MobileNetV2 (``weights=None``, 224 px, batch 32)
  fed by the pipeline, and fed by one batch already in memory as a tensor. The two feeds
  take turns, so that load from other processes affects both alike.

Wall-clock images/s fall when other processes share the cores, and more so for the
pipeline, which uses every core, than for the baseline, which uses one. The loaders
therefore take turns pass by pass, each loader's images/s is the median over its passes
(the slowest and fastest pass are reported too), and the script also reports the CPU time
of the whole process per image, summed over threads, and the 1-minute load average before
and after.

Prints a table, then as the last line one JSON object with the figures, where ``ratio`` is
the pipeline's images/s divided by the baseline's.

Run from the repository root::

    python bench/input_pipeline.py
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from _machine import SHARED_DATA  # noqa: E402
from data.augment import build_augmentation  # noqa: E402
from data.pipeline import make_dataset  # noqa: E402

SOURCE_FOLDER = SHARED_DATA / "isic-cc0-550"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--images", type=int, default=256, help="ISIC images to use, at most 550 (default 256)")
    data.add_argument("--image-size", type=int, default=224, help="side of the resized images in pixels (default 224)")
    data.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    data.add_argument("--intensity", type=float, default=0.5, help="augmentation intensity in [0, 1] (default 0.5)")
    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--epochs", type=int, default=5,
        help="timed passes per loader; the loaders take turns pass by pass (default 5)",
    )
    timing.add_argument(
        "--repeats", type=int, default=8,
        help="times each pass goes over the images, so a pass of 256 images has 2,048 (default 8)",
    )
    timing.add_argument(
        "--train-rounds", type=int, default=6,
        help="rounds of training; each round fits a few steps from memory and from the pipeline, "
        "in an order that flips every round (default 6)",
    )
    timing.add_argument(
        "--train-steps", type=int, default=2,
        help="timed training steps per feed and round, after one untimed step (default 2)",
    )
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    if not SOURCE_FOLDER.is_dir():
        print(f"SKIP: ISIC images not found at {SOURCE_FOLDER}. This benchmark needs ../shared/data/isic-cc0-550.")
        return 0
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lesiontune-bench-") as folder:
        cache_path, labels = write_inputs(Path(folder), arguments.images, arguments.image_size)
        images = np.load(cache_path, mmap_mode="r")
        # A pass goes over the images --repeats times, like a real epoch of thousands of images, so that
        # starting and ending an iteration (up to about 70 ms for tf.data here) weighs as little as in training.
        rows = np.tile(np.arange(images.shape[0]), arguments.repeats)
        labels = np.tile(labels, arguments.repeats)
        augmentation = build_augmentation(arguments.intensity, image_size=arguments.image_size)

        augmented = make_dataset(
            images, rows, labels, batch_size=arguments.batch_size, augmentation=augmentation, shuffle=True
        )
        plain = make_dataset(images, rows, labels, batch_size=arguments.batch_size, shuffle=True)
        equal_work = make_dataset(
            images, rows, labels, batch_size=arguments.batch_size, augmentation=baseline_augmentation(), shuffle=True
        )
        passes = {
            "pipeline": dataset_pass(augmented),
            "plain_pipeline": dataset_pass(plain),
            "equal_work_pipeline": dataset_pass(equal_work),
            "baseline": image_data_generator_pass(Path(folder) / "jpeg", arguments),
        }
        timings = time_passes_alternately(passes, arguments.epochs)
        pipeline, plain_pipeline = timings["pipeline"], timings["plain_pipeline"]
        equal_work_pipeline, baseline = timings["equal_work_pipeline"], timings["baseline"]

        step_in_memory, step_pipeline = time_training_steps(augmented.repeat(), arguments)

    figures = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, {platform.system()}",
        "versions": f"tensorflow {tf.__version__}, keras {keras.__version__}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "images": int(images.shape[0]),
        "images_per_pass": int(rows.shape[0]),
        "passes": arguments.epochs,
        "image_size": arguments.image_size,
        "batch_size": arguments.batch_size,
        "intensity": arguments.intensity,
        "pipeline_images_per_s": round(pipeline.images_per_second, 1),
        "pipeline_no_augmentation_images_per_s": round(plain_pipeline.images_per_second, 1),
        "pipeline_baseline_augmentation_images_per_s": round(equal_work_pipeline.images_per_second, 1),
        "baseline_images_per_s": round(baseline.images_per_second, 1),
        "pipeline_images_per_s_range": [round(rate, 1) for rate in pipeline.range_per_second],
        "baseline_images_per_s_range": [round(rate, 1) for rate in baseline.range_per_second],
        "ratio": round(pipeline.images_per_second / baseline.images_per_second, 2),
        "pipeline_cpu_ms_per_image": round(pipeline.cpu_ms_per_image, 3),
        "pipeline_no_augmentation_cpu_ms_per_image": round(plain_pipeline.cpu_ms_per_image, 3),
        "pipeline_baseline_augmentation_cpu_ms_per_image": round(equal_work_pipeline.cpu_ms_per_image, 3),
        "baseline_cpu_ms_per_image": round(baseline.cpu_ms_per_image, 3),
        "cpu_ratio": round(baseline.cpu_ms_per_image / pipeline.cpu_ms_per_image, 2),
        "train_step_s_in_memory": round(step_in_memory, 3),
        "train_step_s_pipeline": round(step_pipeline, 3),
        "train_step_ratio": round(step_pipeline / step_in_memory, 3),
    }
    print_table(figures)
    print(json.dumps(figures))
    return 0


def write_inputs(folder: Path, count: int, image_size: int) -> tuple[Path, np.ndarray]:
    """Write the first `count` ISIC images as a `(count, S, S, 3)` uint8 .npy cache and as JPEG class folders."""
    with open(SOURCE_FOLDER / "metadata.csv", newline="") as metadata_file:
        records = sorted(csv.DictReader(metadata_file), key=lambda record: record["isic_id"])[:count]
    labels = np.array([record["benign_malignant"] == "malignant" for record in records], dtype=np.float32)

    cache_path = folder / "cache.npy"
    cache = np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.uint8, shape=(len(records), image_size, image_size, 3))
    for index, record in enumerate(records):
        bgr = cv2.imread(str(SOURCE_FOLDER / f"{record['isic_id']}.jpg"), cv2.IMREAD_COLOR)
        bgr = cv2.resize(bgr, (image_size, image_size), interpolation=cv2.INTER_AREA)
        cache[index] = bgr[:, :, ::-1]

        class_folder = folder / "jpeg" / record["benign_malignant"]
        class_folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(class_folder / f"{record['isic_id']}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    cache.flush()
    return cache_path, labels


@dataclass(frozen=True)
class LoaderTiming:
    """Throughput of one image loader: median wall-clock images/s over passes, and CPU time of the process per image."""

    images_per_second: float
    range_per_second: tuple[float, float]  # slowest and fastest pass
    cpu_ms_per_image: float




def baseline_augmentation() -> A.Compose:
    """Rebuild the baseline's ImageDataGenerator augmentation in Albumentations, for an equal-work comparison."""
    # rotation_range=90 draws an angle in [-90, 90] degrees for every image, and the default
    # fill_mode="nearest" repeats the edge pixels.
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(rotate=(-90.0, 90.0), border_mode=cv2.BORDER_REPLICATE, p=1.0),
        ]
    )


def time_passes_alternately(passes: dict[str, Callable[[], int]], epochs: int) -> dict[str, LoaderTiming]:
    """Time `epochs` passes of each loader, taking the loaders in turn so that they share the same load.

    Each callable runs one pass over the images and returns the number of images it yielded.
    One untimed pass of each loader comes first, to start threads and fill caches. A loader's
    images/s is the median of its passes, so one slow pass (another process on the machine, or
    a slow end of iteration) does not decide the figure. Its CPU time is summed over all passes.
    """
    for run_pass in passes.values():
        run_pass()
    rates: dict[str, list[float]] = {name: [] for name in passes}
    images = dict.fromkeys(passes, 0)
    cpu_seconds = dict.fromkeys(passes, 0.0)
    for _ in range(epochs):
        for name, run_pass in passes.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            count = run_pass()
            rates[name].append(count / (time.perf_counter() - wall_start))
            cpu_seconds[name] += time.process_time() - cpu_start
            images[name] += count
    return {
        name: LoaderTiming(statistics.median(rates[name]), (min(rates[name]), max(rates[name])),
                           1000.0 * cpu_seconds[name] / images[name])
        for name in passes
    }


def dataset_pass(dataset: tf.data.Dataset) -> Callable[[], int]:
    """Return a callable that iterates the dataset once and returns the number of images."""

    def run_pass() -> int:
        return sum(int(x.shape[0]) for x, _ in dataset)

    return run_pass


def image_data_generator_pass(jpeg_folder: Path, arguments: argparse.Namespace) -> Callable[[], int]:
    """Return a callable that draws one epoch of batches from the legacy ImageDataGenerator."""
    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        horizontal_flip=True, vertical_flip=True, rotation_range=90
    )
    iterator = generator.flow_from_directory(
        str(jpeg_folder),
        target_size=(arguments.image_size, arguments.image_size),
        batch_size=arguments.batch_size,
        class_mode="binary",
        shuffle=True,
        seed=0,
    )

    def run_pass() -> int:
        return sum(next(iterator)[0].shape[0] for _ in range(arguments.repeats * len(iterator)))

    return run_pass


class _StepTimer(keras.callbacks.Callback):
    """Records the wall time between consecutive training batch ends, which includes waiting for data."""

    def __init__(self):
        super().__init__()
        self.step_seconds: list[float] = []
        self._last_end: float | None = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last_end is not None:
            self.step_seconds.append(now - self._last_end)
        self._last_end = now


def time_training_steps(pipeline: tf.data.Dataset, arguments: argparse.Namespace) -> tuple[float, float]:
    """Return the median training step time in seconds fed from memory and fed by the pipeline."""
    size = arguments.image_size
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(size, size, 3), classes=1, classifier_activation="sigmoid"
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = next(iter(pipeline))
    in_memory = tf.data.Dataset.from_tensors((tf.identity(x), tf.identity(y))).repeat()

    # The first fits trace the step function for each input signature, so they are not timed.
    model.fit(in_memory, steps_per_epoch=2, epochs=1, verbose=0)
    model.fit(pipeline, steps_per_epoch=2, epochs=1, verbose=0)
    step_seconds = {"memory": [], "pipeline": []}
    feeds = [("memory", in_memory), ("pipeline", pipeline)]
    for round_index in range(arguments.train_rounds):
        # The order flips every round, so neither feed always runs right after the other.
        for feed, dataset in feeds if round_index % 2 == 0 else feeds[::-1]:
            timer = _StepTimer()
            model.fit(dataset, steps_per_epoch=arguments.train_steps + 1, epochs=1, verbose=0, callbacks=[timer])
            step_seconds[feed].extend(timer.step_seconds)
    return statistics.median(step_seconds["memory"]), statistics.median(step_seconds["pipeline"])


def print_table(figures: dict) -> None:
    size = figures["image_size"]
    rows = [
        (f"make_dataset, memmap cache, intensity {figures['intensity']} (median pass)", f"{figures['pipeline_images_per_s']:.0f} images/s"),
        ("make_dataset, memmap cache, no augmentation", f"{figures['pipeline_no_augmentation_images_per_s']:.0f} images/s"),
        (
            "make_dataset, memmap cache, flips + rotation in [-90, 90]",
            f"{figures['pipeline_baseline_augmentation_images_per_s']:.0f} images/s",
        ),
        ("ImageDataGenerator flips + rotation_range=90, JPEG folders", f"{figures['baseline_images_per_s']:.0f} images/s"),
        (
            f"slowest / fastest pass, make_dataset, intensity {figures['intensity']}",
            "{:.0f} / {:.0f} images/s".format(*figures["pipeline_images_per_s_range"]),
        ),
        (
            "slowest / fastest pass, ImageDataGenerator",
            "{:.0f} / {:.0f} images/s".format(*figures["baseline_images_per_s_range"]),
        ),
        ("ratio make_dataset / ImageDataGenerator", f"{figures['ratio']:.1f}x"),
        (f"CPU per image, make_dataset, intensity {figures['intensity']}", f"{figures['pipeline_cpu_ms_per_image']:.3f} ms"),
        ("CPU per image, make_dataset, no augmentation", f"{figures['pipeline_no_augmentation_cpu_ms_per_image']:.3f} ms"),
        (
            "CPU per image, make_dataset, flips + rotation in [-90, 90]",
            f"{figures['pipeline_baseline_augmentation_cpu_ms_per_image']:.3f} ms",
        ),
        ("CPU per image, ImageDataGenerator", f"{figures['baseline_cpu_ms_per_image']:.3f} ms"),
        ("ratio CPU per image ImageDataGenerator / make_dataset", f"{figures['cpu_ratio']:.1f}x"),
        (f"MobileNetV2 step, batch {figures['batch_size']}, {size} px, tensor in memory", f"{figures['train_step_s_in_memory']:.3f} s"),
        (f"MobileNetV2 step, batch {figures['batch_size']}, {size} px, make_dataset", f"{figures['train_step_s_pipeline']:.3f} s"),
        ("ratio make_dataset / in memory", f"{figures['train_step_ratio']:.3f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    print(
        f"{figures['date']}, {figures['machine']}, {figures['versions']}, {figures['images']} images, "
        f"1-minute load average {figures['load_average_1min'][0]} before and {figures['load_average_1min'][1]} after"
    )
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")


if __name__ == "__main__":
    sys.exit(main())
