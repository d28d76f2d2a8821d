"""Trial resources: an estimate of each trial's memory and how many trials fit on the cluster's nodes.

Ray's default packs one trial per CPU, which on a GPU node with much RAM per core is too few and on a
CPU node training large backbones is too many, because each trial keeps its model, its activations and
its input buffers in host memory. When ``search.max_concurrent_trials`` is not set, the driver takes the
smallest of three limits on each node (CPUs, GPUs, memory) and adds the nodes up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from spaces.config import ExperimentConfig
from trainables.backbones import get_backbone

__all__ = ["ConcurrencyPlan", "NodeResources", "estimate_trial_memory", "local_node", "nodes_from_ray", "plan_concurrency"]

GIB = 1024**3

# Resident memory of a trial worker before it builds a model: Python, Ray's worker, TensorFlow and
# Keras imported. Measured at 0.72 GiB with Ray 2.60 and TensorFlow 2.21 on Linux, rounded up.
RUNTIME_BYTES = 1 * GIB

# Bytes per backbone weight while training with Adam: the weight, its gradient and two moments, float32.
BYTES_PER_TRAINED_WEIGHT = 16

# Training keeps every layer's output for the backward pass. On CPU, the measured peak above the built
# model, less the Adam state, was 0.97x to 1.71x the float32 size of the summed layer outputs, over runs of
# MobileNetV2, ResNet50 and EfficientNetV2B0 at 64 to 224 px. The estimate takes 2x.
ACTIVATION_OVERHEAD = 2.0

# Batches that tf.data may hold at once in the trial's input pipeline (map in flight plus prefetch),
# each as uint8 pixels and their float32 copy (5 bytes per value).
BUFFERED_BATCHES = 4


@dataclass(frozen=True)
class NodeResources:
    """Resources that one Ray node offers to trials."""

    cpus: float
    gpus: float | None  # None when unknown (a dry run does not look for GPUs), which sets no limit
    memory_bytes: float  # Ray's "memory" resource: RAM that tasks and actors may use on the node


@dataclass(frozen=True)
class ConcurrencyPlan:
    """How many trials run at once, and which resource sets that number."""

    trials: int
    limited_by: str  # "configured", "cpu", "gpu" or "memory"
    trial_memory_bytes: int
    cache_bytes: int

    def describe(self) -> str:
        """Return one line for the log and ``--dry-run``."""
        trials = "1 trial" if self.trials == 1 else f"{self.trials} trials"
        if self.limited_by == "configured":
            return f"{trials} at once (search.max_concurrent_trials)"
        return (f"{trials} at once, limited by {self.limited_by} (estimated {self.trial_memory_bytes / GIB:.1f} "
                f"GiB per trial, image cache {self.cache_bytes / GIB:.2f} GiB per node)")


def estimate_trial_memory(config: ExperimentConfig) -> int:
    """Return an upper estimate of one trial's host memory in bytes, for the largest configuration in the space.

    A trial with a GPU keeps its model and activations in GPU memory, so only the runtime and the input
    buffers count. A CPU trial also counts its weights with Adam's state and the activations of a batch.
    """
    sizes = [int(s) for s in config.space["image_size"].candidates()]
    batch = int(max(config.space["batch_size"].candidates()))
    largest = max(sizes)
    buffers = BUFFERED_BATCHES * batch * largest * largest * 3 * 5
    if config.resources["gpus_per_trial"] > 0:
        return int(RUNTIME_BYTES + buffers)

    model = 0
    for name in config.space["backbone"].candidates():
        spec = get_backbone(name)
        activations = spec.activations * (largest / 224) ** 2 * batch * 4 * ACTIVATION_OVERHEAD
        model = max(model, spec.parameters * BYTES_PER_TRAINED_WEIGHT + activations)
    return int(RUNTIME_BYTES + buffers + model)


def plan_concurrency(config: ExperimentConfig, nodes: Iterable[NodeResources], *, cache_bytes: int) -> ConcurrencyPlan:
    """Return how many trials run at once on these nodes.

    Args:
        config: the validated experiment; ``search.max_concurrent_trials`` wins when it is set.
        nodes: the alive nodes of the cluster.
        cache_bytes: size of the image caches that trials read. Each node keeps the pages that its trials
            read in its page cache once, whatever the number of trials, so it is subtracted once per node.
    """
    trial_memory = estimate_trial_memory(config)
    configured = config.search["max_concurrent_trials"]
    if configured:
        return ConcurrencyPlan(int(configured), "configured", trial_memory, cache_bytes)

    cpus_per_trial, gpus_per_trial = config.resources["cpus_per_trial"], config.resources["gpus_per_trial"]
    trials = 0
    binding_nodes = {"cpu": 0, "gpu": 0, "memory": 0}
    for node in nodes:
        # The small tolerance keeps 0.7 / 0.1 (6.999... in floating point) from rounding down to 6. On a tie, min() names the
        # first resource in this order.
        limits = {}
        if gpus_per_trial and node.gpus is not None:
            limits["gpu"] = math.floor(node.gpus / gpus_per_trial + 1e-9)
        limits["memory"] = max(0, math.floor((node.memory_bytes - cache_bytes) / trial_memory))
        limits["cpu"] = math.floor(node.cpus / cpus_per_trial + 1e-9)
        binding = min(limits, key=limits.get)
        binding_nodes[binding] += 1
        trials += limits[binding]
    limited_by = max(binding_nodes, key=binding_nodes.get)
    return ConcurrencyPlan(max(1, trials), limited_by, trial_memory, cache_bytes)


def local_node() -> NodeResources:
    """Return this machine as a local Ray would offer it: usable CPUs, GPUs unknown, 70 % of the available memory.

    Ray keeps about 30 % of the available memory for its object store by default.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return NodeResources(cpus=float(cpus), gpus=None, memory_bytes=0.7 * _available_memory_bytes())


def _available_memory_bytes() -> float:
    """Return MemAvailable from /proc/meminfo (free memory plus reclaimable caches), else the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def nodes_from_ray(ray_nodes: Iterable[Mapping]) -> list[NodeResources]:
    """Convert ``ray.nodes()`` to :class:`NodeResources`, keeping alive nodes that offer CPUs."""
    nodes = []
    for node in ray_nodes:
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("CPU", 0) > 0:
            nodes.append(NodeResources(cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                                       memory_bytes=resources.get("memory", 0.0)))
    return nodes
