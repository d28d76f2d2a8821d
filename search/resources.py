"""Trial resources: an estimate of each trial's memory and how many trials fit on the cluster's nodes.

Ray's default packs one trial per CPU, which on a GPU node with much RAM per core is too few and on a
CPU node training large backbones is too many, because each trial keeps its model, its activations and
its input buffers in host memory. When ``search.max_concurrent_trials`` is not set, the driver takes the
smallest of three limits on each node (CPUs, GPUs, memory) and adds the nodes up.

Trials that use GPUs also get an estimate of their GPU memory for the largest configuration in the space,
which the dry run and the driver compare with each trial's share of a GPU. The comparison only warns.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from spaces.config import ExperimentConfig
from trainables.backbones import BackboneSpec, get_backbone
from trainables.gpu import gpu_total_memory_mib

__all__ = ["ConcurrencyPlan", "GpuMemory", "GpuMemoryCheck", "GpuMemoryEstimate", "NodeResources", "check_gpu_memory",
           "estimate_trial_gpu_memory", "estimate_trial_memory", "find_gpu_memory", "local_node", "nodes_from_ray",
           "plan_concurrency"]

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

# NOTE: no GPU constant below is measured on a GPU, because none was available when they were chosen. Each
# leans high, and an estimate above a trial's share only warns.

# GPU memory that a trial's process uses outside TensorFlow's allocator, and so outside the memory limit of
# a trial with a fraction of a GPU: the CUDA context with the cuDNN and cuBLAS kernels loaded. It counts
# against the share because the shares of the trials packed on one GPU add up to the whole GPU. The value
# is a guess above the few hundred MiB that a CUDA context usually takes.
GPU_CONTEXT_BYTES = 1 * GIB

# Extra bytes per weight under Keras's "mixed_float16" policy, which keeps float32 weights: the float16 copy
# that each layer computes with, and its float16 gradient before the cast back to float32.
MIXED_PRECISION_EXTRA_BYTES_PER_WEIGHT = 4

# Bytes per activation value: float32, or float16 under mixed precision.
BYTES_PER_ACTIVATION = {False: 4, True: 2}

# Peak GPU memory of the activations over their float32 or float16 size. This reuses the CPU measurement
# behind ACTIVATION_OVERHEAD. TensorFlow's GPU allocator rounds and splits its chunks, and the cuDNN
# convolution workspace comes from that allocator too, so both fall inside this factor. TensorFlow's
# convolution kernels cap the workspace at TF_CUDNN_WORKSPACE_LIMIT_IN_MB (4 GiB by default), and the
# autotuner skips algorithms whose workspace does not fit.
GPU_ACTIVATION_OVERHEAD = ACTIVATION_OVERHEAD


@dataclass(frozen=True)
class NodeResources:
    """Resources that one Ray node offers to trials."""

    cpus: float
    gpus: float | None  # None when unknown (a dry run does not look for GPUs), which sets no limit
    memory_bytes: float  # Ray's "memory" resource: RAM that tasks and actors may use on the node


@dataclass(frozen=True)
class GpuMemory:
    """The memory of one GPU on the nodes that run trials, and where that number comes from."""

    total_bytes: int | None  # None when unknown, which skips the GPU memory check
    source: str  # "resources.gpu_memory_gib", "nvidia-smi on this machine", or why the memory is unknown


@dataclass(frozen=True)
class GpuMemoryEstimate:
    """An upper estimate of one trial's GPU memory, for the configuration in the space that needs the most."""

    backbone: str
    image_size: int  # pixels
    batch_size: int  # images
    mixed_precision: bool
    trial_bytes: int

    def describe(self) -> str:
        """Return the configuration, e.g. ``ResNet50 at 224 px with batch size 64 in float32``."""
        precision = "mixed precision" if self.mixed_precision else "float32"
        return f"{self.backbone} at {self.image_size} px with batch size {self.batch_size} in {precision}"


@dataclass(frozen=True)
class GpuMemoryCheck:
    """One trial's estimated GPU memory against its share of a GPU."""

    estimate: GpuMemoryEstimate
    gpus_per_trial: float
    gpu: GpuMemory

    @property
    def share_bytes(self) -> int | None:
        """GPU memory that one trial may use, in bytes, or None when the GPU's memory is unknown.

        A fraction of a GPU is that fraction of its memory, which is also the trial's TensorFlow memory limit.
        One or more GPUs give one GPU's memory, because a trial trains on a single GPU.
        """
        if self.gpu.total_bytes is None:
            return None
        return int(self.gpu.total_bytes * min(1.0, self.gpus_per_trial))

    @property
    def fits(self) -> bool | None:
        """True when the estimate fits in the share, False when it does not, None when the GPU's memory is unknown."""
        share = self.share_bytes
        return None if share is None else self.estimate.trial_bytes <= share

    def describe(self) -> str:
        """Return one line, without a final period, for the log and ``--dry-run``."""
        estimate = (f"GPU memory per trial: estimated {self.estimate.trial_bytes / GIB:.1f} GiB for "
                    f"{self.estimate.describe()}")
        share = self.share_bytes
        if share is None:
            return (f"{estimate}, not checked because the GPU's memory is unknown ({self.gpu.source}). Set "
                    "resources.gpu_memory_gib (--gpu-memory-gib) to check it")
        verdict = "fits in" if self.fits else "exceeds"
        return f"{estimate}, which {verdict} the share of {share / GIB:.1f} GiB ({self._share_origin()})"

    def warning(self) -> str | None:
        """Return the warning for an estimate above the share, with the fixes, or None when it fits or is unknown."""
        if self.fits is not False:
            return None
        fixes = ["lower the largest space.batch_size or space.image_size"]
        trials_per_gpu = math.floor(self.gpu.total_bytes / self.estimate.trial_bytes)
        if trials_per_gpu == 1:
            fixes.insert(0, "raise resources.gpus_per_trial to 1")
        elif trials_per_gpu > 1:
            fixes.insert(0, f"raise resources.gpus_per_trial to {1 / trials_per_gpu:g} "
                            f"({trials_per_gpu} trials per GPU)")
        if not self.estimate.mixed_precision:
            fixes.append("set training.mixed_precision: true")
        return (f"The largest configuration in the space, {self.estimate.describe()}, needs an estimated "
                f"{self.estimate.trial_bytes / GIB:.1f} GiB of GPU memory. A trial's share is only "
                f"{self.share_bytes / GIB:.1f} GiB ({self._share_origin()}), so trials with this configuration may "
                f"fail with out-of-memory errors. To fix it, {_join_alternatives(fixes)}.")

    def _share_origin(self) -> str:
        gpu = f"{self.gpu.total_bytes / GIB:.1f} GiB per GPU from {self.gpu.source}"
        if self.gpus_per_trial < 1:
            return f"resources.gpus_per_trial {self.gpus_per_trial:g} x {gpu}"
        return f"the memory of one GPU, {gpu}, since a trial trains on a single GPU"


def _join_alternatives(phrases: list[str]) -> str:
    """Join phrases as ``a, b, or c``."""
    if len(phrases) == 1:
        return phrases[0]
    return f"{', '.join(phrases[:-1])}, or {phrases[-1]}"


@dataclass(frozen=True)
class ConcurrencyPlan:
    """How many trials run at once, which resource sets that number, and the GPU memory check."""

    trials: int
    limited_by: str  # "configured", "cpu", "gpu" or "memory"
    trial_memory_bytes: int
    cache_bytes: int
    gpu_memory: GpuMemoryCheck | None = None  # None when trials use no GPU

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


def estimate_trial_gpu_memory(config: ExperimentConfig) -> GpuMemoryEstimate:
    """Return an upper estimate of one trial's GPU memory, for the configuration in the space that needs the most.

    The estimate takes the largest image size and batch size with each backbone, counts every backbone weight
    as trained (true when training from scratch, an overestimate when pretrained layers stay frozen), and
    keeps the backbone that needs the most. It includes the CUDA context, which TensorFlow's memory limit does
    not cover. The precision is ``training.mixed_precision``.
    """
    image_size = int(max(config.space["image_size"].candidates()))
    batch_size = int(max(config.space["batch_size"].candidates()))
    mixed_precision = bool(config.training["mixed_precision"])
    estimates = [
        GpuMemoryEstimate(name, image_size, batch_size, mixed_precision,
                          _gpu_trial_bytes(get_backbone(name), image_size, batch_size, mixed_precision))
        for name in config.space["backbone"].candidates()
    ]
    return max(estimates, key=lambda estimate: estimate.trial_bytes)


def _gpu_trial_bytes(spec: BackboneSpec, image_size: int, batch_size: int, mixed_precision: bool) -> int:
    bytes_per_weight = BYTES_PER_TRAINED_WEIGHT + (MIXED_PRECISION_EXTRA_BYTES_PER_WEIGHT if mixed_precision else 0)
    # NOTE: Keras 3.15's BatchNormalization computes in float32 under mixed_float16, so mixed precision saves
    # less than half of the activations of backbones with many such layers. The overhead factor absorbs some
    # of that, but by how much is not measured.
    activation_values = spec.activations * (image_size / 224) ** 2 * batch_size
    activations = activation_values * BYTES_PER_ACTIVATION[mixed_precision] * GPU_ACTIVATION_OVERHEAD
    return int(GPU_CONTEXT_BYTES + spec.parameters * bytes_per_weight + activations)


def find_gpu_memory(config: ExperimentConfig, *, query_nvidia_smi: bool = True) -> GpuMemory:
    """Return the memory of one GPU: ``resources.gpu_memory_gib``, else nvidia-smi on this machine, else unknown.

    nvidia-smi reads the GPU of the machine that runs the search, which on a cluster is often a head node
    without GPUs, or with other GPUs than the workers. Set ``resources.gpu_memory_gib`` in that case.
    """
    configured = config.resources["gpu_memory_gib"]
    if configured is not None:
        return GpuMemory(int(configured * GIB), "resources.gpu_memory_gib")
    if not config.resources["gpus_per_trial"]:
        return GpuMemory(None, "trials use no GPU")
    if not query_nvidia_smi:
        return GpuMemory(None, "resources.gpu_memory_gib is not set")
    # Looking for nvidia-smi first keeps gpu_total_memory_mib from logging a warning on machines without GPUs.
    if shutil.which("nvidia-smi") is None:
        return GpuMemory(None, "resources.gpu_memory_gib is not set and this machine has no nvidia-smi")
    total_mib = gpu_total_memory_mib()
    if total_mib is None:
        return GpuMemory(None, "resources.gpu_memory_gib is not set and nvidia-smi failed on this machine")
    return GpuMemory(total_mib * 2**20, "nvidia-smi on this machine")


def check_gpu_memory(config: ExperimentConfig, gpu: GpuMemory) -> GpuMemoryCheck | None:
    """Compare one trial's GPU memory estimate with its share of ``gpu``, or return None when trials use no GPU."""
    gpus_per_trial = float(config.resources["gpus_per_trial"])
    if gpus_per_trial <= 0:
        return None
    return GpuMemoryCheck(estimate_trial_gpu_memory(config), gpus_per_trial, gpu)


def plan_concurrency(config: ExperimentConfig, nodes: Iterable[NodeResources], *, cache_bytes: int,
                     gpu_memory: GpuMemory | None = None) -> ConcurrencyPlan:
    """Return how many trials run at once on these nodes, and the GPU memory check of a trial.

    Args:
        config: the validated experiment; ``search.max_concurrent_trials`` wins when it is set.
        nodes: the alive nodes of the cluster.
        cache_bytes: size of the image caches that trials read. Each node keeps the pages that its trials
            read in its page cache once, whatever the number of trials, so it is subtracted once per node.
        gpu_memory: the memory of one GPU, from :func:`find_gpu_memory`. None takes ``resources.gpu_memory_gib``
            and does not run nvidia-smi.
    """
    trial_memory = estimate_trial_memory(config)
    # An estimate above the share does not lower the number of trials per GPU. Each trial's TensorFlow memory
    # limit is gpus_per_trial of the GPU whatever the number of trials running beside it, so fewer trials would
    # leave GPU memory idle and still fail. Only a larger gpus_per_trial raises the limit, and it also packs
    # fewer trials per GPU. The estimate is not measured on a GPU either, so it should not overrule the user.
    gpu_check = check_gpu_memory(config, gpu_memory or find_gpu_memory(config, query_nvidia_smi=False))
    configured = config.search["max_concurrent_trials"]
    if configured:
        return ConcurrencyPlan(int(configured), "configured", trial_memory, cache_bytes, gpu_check)

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
    return ConcurrencyPlan(max(1, trials), limited_by, trial_memory, cache_bytes, gpu_check)


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
