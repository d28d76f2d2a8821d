"""Benchmark: resident memory that the input pipeline adds to each trial, with 2 and 4 trials at once.

Trials read the uint8 image cache through a read-only memory map, so the pages they read live once in
the node's page cache, shared by every trial, and count as file-backed, not private, memory. This
script measures what each trial adds in private memory because of its data, the model excluded.

Each "trial" is a Ray task with the product's code: it opens the image cache, balances the training
rows (``class_weight``), builds MobileNetV2 (``weights=None``) and trains a fixed number of steps. A
thread in the task samples its own ``RssAnon`` (private) and ``RssFile`` (mapped files) from
``/proc/self/status`` every 50 ms. Three modes train the same model for the same steps:

- ``in_memory``: one random batch held in memory, fed again each step through ``Model.fit`` on a
  ``tf.data`` dataset, as in the other modes. It sets the model's share: weights, optimizer state,
  activations, Keras's training loop and TensorFlow itself.
- ``pipeline``: ``data.pipeline.make_dataset`` over the memory-mapped cache, shuffled, augmented at
  intensity 0.5 on its thread pool, as a trial reads it.
- ``loaded`` (the baseline): the same pipeline over a copy of the whole cache read into the task's
  memory, as a loader without a memory map would do.

The memory that data adds to a trial is its peak ``RssAnon`` minus the median peak of the
``in_memory`` tasks in the same round. The goal is under 10 % of the cache size for ``pipeline``.
``ratio`` is ``pipeline``'s added memory over ``loaded``'s, at the largest number of trials at once.

Run from the repository root::

    python bench/trial_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import HAM10000_FOLDER, cpu_model_name, skip_without_ham10000

DATA_FOLDER = HAM10000_FOLDER
MIB = 1024**2
MODES = ("in_memory", "pipeline", "loaded")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224, help="cache image side in pixels (default 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per task (default 40)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 4],
                        help="tasks at once per round (default: 2 4)")
    parser.add_argument("--malloc-arena-max", type=int, default=None,
                        help="set MALLOC_ARENA_MAX in the tasks, to compare glibc allocator settings (default: unset)")
    return parser.parse_args()


def read_rss() -> tuple[int, int]:
    """Return (RssAnon, RssFile) of this process in bytes."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, amount, _unit = line.split()
                values[name.rstrip(":")] = int(amount) * 1024
    return values["RssAnon"], values["RssFile"]


def train_task(mode: str, cache_path: str, manifest_path: str, image_size: int, batch_size: int, steps: int,
               seed: int) -> dict:
    """Train MobileNetV2 for ``steps`` steps fed in ``mode``; return the peaks of private and mapped memory."""
    import threading

    import numpy as np

    from data.augment import build_augmentation
    from data.balancing import balance_rows
    from data.cache import open_image_cache
    from data.pipeline import make_dataset
    from data.splits import read_manifest
    from trainables.model import build_classifier, compile_classifier, configure_tensorflow, set_unfrozen_layers

    configure_tensorflow(cpus=1)
    peaks = {"anon": 0, "file": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            anon, mapped = read_rss()
            peaks["anon"], peaks["file"] = max(peaks["anon"], anon), max(peaks["file"], mapped)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    classifier = build_classifier(backbone="MobileNetV2", image_size=image_size, weights="none", dropout=0.2, seed=seed)
    set_unfrozen_layers(classifier, -1)
    compile_classifier(classifier, learning_rate=1e-3, jit_compile=False)

    if mode == "in_memory":
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3)).astype(np.float32)
        y = rng.integers(0, 2, size=batch_size).astype(np.float32)
        import tensorflow as tf

        # The same Keras fit loop on a tf.data dataset as the other modes, fed one batch held in memory.
        batches = tf.data.Dataset.from_tensors((x, y)).repeat()
        classifier.model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    else:
        cache = open_image_cache(cache_path)
        images = np.array(cache.images) if mode == "loaded" else cache.images
        manifest = read_manifest(manifest_path)
        train = manifest[manifest["split"] == "train"]
        balanced = balance_rows(train["cache_row"].to_numpy(), train["label"].to_numpy(), method="class_weight",
                                seed=seed)
        dataset = make_dataset(images, balanced.rows, balanced.labels, batch_size=batch_size,
                               augmentation=build_augmentation(0.5, image_size=image_size), shuffle=True, seed=seed,
                               sample_weights=balanced.sample_weights, drop_remainder=True)
        classifier.model.fit(dataset.repeat(), steps_per_epoch=steps, epochs=1, verbose=0)

    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    return {"mode": mode, "peak_anon": peaks["anon"], "peak_file": peaks["file"], "seconds": seconds}


def prepare(image_size: int, folder: Path) -> tuple[str, str, int]:
    """Build the HAM10000 cache and split through the driver; return the cache path, manifest and cache bytes."""
    from search import driver
    from spaces.config import load_config

    cache_dir = os.environ.get("LESIONTUNE_CACHE")
    config = load_config(overrides={
        "data": {"path": str(DATA_FOLDER), "layout": "ham10000",
                 "cache_dir": str(Path(cache_dir) / "images") if cache_dir else None},
        "training": {"weights": "none"},
        "space": {"backbone": "MobileNetV2", "image_size": image_size},
    })
    prepared = driver.prepare_data(config, folder, progress=False)
    return prepared.cache_paths[image_size], str(prepared.manifest_path), driver.cache_size(prepared.cache_paths)


def main() -> int:
    arguments = parse_arguments()
    if skip_without_ham10000():
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray

    load_before = os.getloadavg()[0]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="lesiontune-bench-memory-") as folder:
        cache_path, manifest_path, cache_bytes = prepare(arguments.image_size, Path(folder))
        env_vars = {"TF_CPP_MIN_LOG_LEVEL": "2"}
        if arguments.malloc_arena_max:
            env_vars["MALLOC_ARENA_MAX"] = str(arguments.malloc_arena_max)
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env_vars})
        try:
            cpus = ray.cluster_resources()["CPU"]
            # max_calls=1 gives each task a fresh worker process, so no task inherits another's memory.
            remote = ray.remote(max_calls=1)(train_task)
            for concurrency in arguments.concurrency:
                for mode in MODES:
                    tasks = [remote.options(num_cpus=cpus / concurrency).remote(
                        mode, cache_path, manifest_path, arguments.image_size, arguments.batch_size,
                        arguments.steps, seed) for seed in range(concurrency)]
                    for result in ray.get(tasks):
                        rounds.append({"concurrency": concurrency, **result})
        finally:
            ray.shutdown()

    rows = []
    for concurrency in arguments.concurrency:
        model = statistics.median(r["peak_anon"] for r in rounds
                                  if r["concurrency"] == concurrency and r["mode"] == "in_memory")
        for mode in MODES:
            results = [r for r in rounds if r["concurrency"] == concurrency and r["mode"] == mode]
            added = [r["peak_anon"] - model for r in results]
            rows.append({
                "concurrency": concurrency, "mode": mode,
                "peak_anon_mib": round(statistics.mean(r["peak_anon"] for r in results) / MIB, 1),
                "peak_file_mib": round(statistics.mean(r["peak_file"] for r in results) / MIB, 1),
                "added_mib": round(statistics.mean(added) / MIB, 1),
                "added_max_mib": round(max(added) / MIB, 1),
                "added_share_of_cache": round(max(added) / cache_bytes, 4),
                "seconds": round(statistics.mean(r["seconds"] for r in results), 1),
            })

    print(f"image cache: {cache_bytes / MIB:.1f} MiB at {arguments.image_size} px; {arguments.steps} steps of "
          f"batch {arguments.batch_size} per task")
    print("| trials at once | feed | peak private MiB | peak mapped files MiB | added by data MiB (mean / max) | "
          "max added / cache | seconds |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['concurrency']} | {row['mode']} | {row['peak_anon_mib']} | {row['peak_file_mib']} | "
              f"{row['added_mib']} / {row['added_max_mib']} | {row['added_share_of_cache']:.3f} | {row['seconds']} |")

    largest = max(arguments.concurrency)
    pipeline = next(r for r in rows if r["concurrency"] == largest and r["mode"] == "pipeline")
    loaded = next(r for r in rows if r["concurrency"] == largest and r["mode"] == "loaded")
    worst = max(r["added_share_of_cache"] for r in rows if r["mode"] == "pipeline")
    figures = {
        "benchmark": "trial_memory",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, {cpu_model_name()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "image_size": arguments.image_size, "batch_size": arguments.batch_size, "steps": arguments.steps,
        "cache_mib": round(cache_bytes / MIB, 1), "malloc_arena_max": arguments.malloc_arena_max,
        "rows": rows,
        "pipeline_max_added_share_of_cache": worst,
        "goal_met": bool(worst < 0.10),
        "ratio": round(pipeline["added_mib"] / loaded["added_mib"], 4) if loaded["added_mib"] > 0 else None,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
