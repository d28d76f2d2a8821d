import pytest

from search.resources import (BYTES_PER_TRAINED_WEIGHT, GIB, GPU_CONTEXT_BYTES, MIXED_PRECISION_EXTRA_BYTES_PER_WEIGHT,
                              RUNTIME_BYTES, GpuMemory, NodeResources, check_gpu_memory, estimate_trial_gpu_memory,
                              estimate_trial_memory, find_gpu_memory, local_node, nodes_from_ray, plan_concurrency)
from spaces.config import load_config


def _config(space=None, resources=None, search=None, training=None):
    overrides = {"space": {"backbone": ["MobileNetV2"], "image_size": [224], "batch_size": [32], **(space or {})}}
    overrides["resources"] = resources or {}
    overrides["search"] = search or {}
    overrides["training"] = training or {}
    return load_config(overrides=overrides)


def test_gpu_trial_memory_excludes_model():
    cpu_trial = estimate_trial_memory(_config())
    gpu_trial = estimate_trial_memory(_config(resources={"gpus_per_trial": 0.5}))

    assert RUNTIME_BYTES < gpu_trial < 2 * GIB
    assert cpu_trial > gpu_trial + 2 * GIB


def test_trial_memory_takes_largest_configuration():
    small = estimate_trial_memory(_config(space={"batch_size": [16], "image_size": [128]}))
    mixed = estimate_trial_memory(_config(space={"batch_size": [16, 64], "image_size": [128, 224]}))
    large = estimate_trial_memory(_config(space={"batch_size": [64], "image_size": [224]}))
    resnet = estimate_trial_memory(_config(space={"backbone": ["MobileNetV2", "ResNet50"], "batch_size": [64]}))

    assert small < mixed
    assert mixed == large
    assert resnet > large


def test_cpu_trial_memory_covers_measured_peak():
    # Measured on Keras 3.15 CPU: MobileNetV2 at 224 px with batch 32 peaked at 3.3 GiB resident.
    assert estimate_trial_memory(_config()) >= 3.3 * GIB


def test_configured_limit_wins():
    plan = plan_concurrency(_config(search={"max_concurrent_trials": 3}), [NodeResources(64, 8, 500 * GIB)],
                            cache_bytes=0)

    assert plan.trials == 3
    assert plan.limited_by == "configured"


def test_cpu_limit_on_cpu_node():
    config = _config(space={"image_size": [64]}, resources={"cpus_per_trial": 2})

    plan = plan_concurrency(config, [NodeResources(16, 0, 200 * GIB)], cache_bytes=GIB)

    assert plan.trials == 8
    assert plan.limited_by == "cpu"


def test_fractional_gpus_pack_trials():
    config = _config(resources={"cpus_per_trial": 2, "gpus_per_trial": 0.25})

    plan = plan_concurrency(config, [NodeResources(96, 8, 700 * GIB)], cache_bytes=20 * GIB)

    assert plan.trials == 32
    assert plan.limited_by == "gpu"


def test_memory_limit_counts_cache_once_per_node():
    config = _config(resources={"gpus_per_trial": 0.125})
    per_trial = estimate_trial_memory(config)
    node = NodeResources(64, 8, 10 * GIB + 5 * per_trial)

    plan = plan_concurrency(config, [node], cache_bytes=10 * GIB)
    two_nodes = plan_concurrency(config, [node, node], cache_bytes=10 * GIB)

    assert plan.trials == 5
    assert plan.limited_by == "memory"
    assert two_nodes.trials == 10


def test_trial_too_large_for_node_still_runs_one():
    plan = plan_concurrency(_config(space={"backbone": ["Xception"], "batch_size": [64]}),
                            [NodeResources(8, 0, 4 * GIB)], cache_bytes=GIB)

    assert plan.trials == 1
    assert plan.limited_by == "memory"
    assert "1 trial at once, limited by memory" in plan.describe()


def test_unknown_gpus_set_no_limit():
    config = _config(space={"image_size": [64]}, resources={"gpus_per_trial": 0.5})

    plan = plan_concurrency(config, [NodeResources(4, None, 100 * GIB)], cache_bytes=0)

    assert plan.trials == 4
    assert plan.limited_by == "cpu"


def test_nodes_from_ray_skips_dead_and_cpuless_nodes():
    ray_nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 30e9}},
        {"Alive": False, "Resources": {"CPU": 8.0, "memory": 30e9}},
        {"Alive": True, "Resources": {"memory": 1e9}},
    ]

    nodes = nodes_from_ray(ray_nodes)

    assert nodes == [NodeResources(8.0, 1.0, 30e9)]


def test_local_node_reports_memory():
    node = local_node()

    assert node.cpus >= 1
    assert node.gpus is None
    assert node.memory_bytes > 0


@pytest.mark.parametrize("cpus_per_trial", [0.5, 1, 3])
def test_cpu_limit_rounds_down(cpus_per_trial):
    config = _config(space={"image_size": [64]}, resources={"cpus_per_trial": cpus_per_trial})

    plan = plan_concurrency(config, [NodeResources(7, 0, 1000 * GIB)], cache_bytes=0)

    assert plan.trials == int(7 // cpus_per_trial)


def _gpu_config(*, backbones=("ResNet50",), batch_sizes=(64,), image_sizes=(224,), mixed_precision=False,
                gpus_per_trial=0.25, gpu_memory_gib=80):
    return _config(space={"backbone": list(backbones), "batch_size": list(batch_sizes), "image_size": list(image_sizes)},
                   resources={"gpus_per_trial": gpus_per_trial, "gpu_memory_gib": gpu_memory_gib},
                   training={"mixed_precision": mixed_precision})


def _activation_bytes(estimate, parameters):
    """Subtract the context and the weights from a GPU estimate, leaving the activations."""
    per_weight = BYTES_PER_TRAINED_WEIGHT + (MIXED_PRECISION_EXTRA_BYTES_PER_WEIGHT if estimate.mixed_precision else 0)
    return estimate.trial_bytes - GPU_CONTEXT_BYTES - parameters * per_weight


def test_gpu_estimate_grows_with_batch_size():
    small = estimate_trial_gpu_memory(_gpu_config(batch_sizes=[16]))
    large = estimate_trial_gpu_memory(_gpu_config(batch_sizes=[16, 64]))

    assert large.batch_size == 64
    assert large.trial_bytes > small.trial_bytes
    assert _activation_bytes(large, 23_587_712) == pytest.approx(4 * _activation_bytes(small, 23_587_712), rel=1e-6)


def test_gpu_estimate_grows_with_image_size():
    small = estimate_trial_gpu_memory(_gpu_config(image_sizes=[112]))
    large = estimate_trial_gpu_memory(_gpu_config(image_sizes=[112, 224]))

    assert large.image_size == 224
    assert large.trial_bytes > small.trial_bytes
    assert _activation_bytes(large, 23_587_712) == pytest.approx(4 * _activation_bytes(small, 23_587_712), rel=1e-6)


def test_gpu_estimate_mixed_precision_halves_activations():
    float32 = estimate_trial_gpu_memory(_gpu_config())
    mixed = estimate_trial_gpu_memory(_gpu_config(mixed_precision=True))

    assert not float32.mixed_precision
    assert mixed.mixed_precision
    assert _activation_bytes(mixed, 23_587_712) == pytest.approx(_activation_bytes(float32, 23_587_712) / 2, rel=1e-6)
    assert mixed.trial_bytes < float32.trial_bytes


def test_gpu_estimate_takes_largest_backbone():
    estimate = estimate_trial_gpu_memory(_gpu_config(backbones=["MobileNetV2", "ResNet50", "EfficientNetV2B0"]))

    assert estimate.backbone == "ResNet50"
    assert estimate.trial_bytes == estimate_trial_gpu_memory(_gpu_config()).trial_bytes


def test_gpu_estimate_covers_raw_activations():
    # ResNet50 at 224 px and batch 64 outputs 36,966,636 x 64 float32 values over its layers (9.5 GB).
    estimate = estimate_trial_gpu_memory(_gpu_config())

    assert estimate.trial_bytes > 36_966_636 * 64 * 4 + 23_587_712 * 16 + GPU_CONTEXT_BYTES


def test_gpu_check_fits_quarter_of_80_gib():
    check = check_gpu_memory(_gpu_config(), GpuMemory(80 * GIB, "resources.gpu_memory_gib"))

    assert check.share_bytes == 20 * GIB
    assert check.fits is True
    assert check.warning() is None
    assert "fits in the share of 20.0 GiB" in check.describe()


def test_gpu_warning_names_configuration_and_fixes():
    check = check_gpu_memory(_gpu_config(gpus_per_trial=0.125), GpuMemory(80 * GIB, "resources.gpu_memory_gib"))

    warning = check.warning()

    assert check.fits is False
    assert "ResNet50 at 224 px with batch size 64 in float32" in warning
    assert f"needs an estimated {check.estimate.trial_bytes / GIB:.1f} GiB of GPU memory" in warning
    assert "A trial's share is only 10.0 GiB (resources.gpus_per_trial 0.125 x 80.0 GiB per GPU" in warning
    assert "raise resources.gpus_per_trial to 0.25 (4 trials per GPU)" in warning
    assert "lower the largest space.batch_size or space.image_size" in warning
    assert "set training.mixed_precision: true" in warning
    assert "exceeds the share of 10.0 GiB" in check.describe()


def test_gpu_warning_mixed_precision_omits_fix():
    check = check_gpu_memory(_gpu_config(mixed_precision=True, gpus_per_trial=0.125),
                             GpuMemory(80 * GIB, "resources.gpu_memory_gib"))

    warning = check.warning()

    assert "in mixed precision" in warning
    assert "training.mixed_precision" not in warning


def test_gpu_warning_whole_gpu_too_small():
    check = check_gpu_memory(_gpu_config(backbones=["EfficientNetV2L"], gpus_per_trial=2, gpu_memory_gib=24),
                             GpuMemory(24 * GIB, "resources.gpu_memory_gib"))

    warning = check.warning()

    assert check.share_bytes == 24 * GIB
    assert "since a trial trains on a single GPU" in warning
    assert "resources.gpus_per_trial" not in warning.split("To fix it,")[1]


def test_gpu_check_unknown_memory():
    check = check_gpu_memory(_gpu_config(gpu_memory_gib=None), GpuMemory(None, "no nvidia-smi"))

    assert check.share_bytes is None
    assert check.fits is None
    assert check.warning() is None
    assert "not checked because the GPU's memory is unknown (no nvidia-smi)" in check.describe()


def test_gpu_check_absent_for_cpu_trials():
    config = _config()

    assert check_gpu_memory(config, GpuMemory(80 * GIB, "resources.gpu_memory_gib")) is None
    assert plan_concurrency(config, [NodeResources(8, 0, 100 * GIB)], cache_bytes=0).gpu_memory is None


def test_find_gpu_memory_prefers_config_key(monkeypatch):
    monkeypatch.setattr("search.resources.gpu_total_memory_mib", lambda: pytest.fail("nvidia-smi was queried"))

    gpu = find_gpu_memory(_gpu_config(gpu_memory_gib=40.5))

    assert gpu == GpuMemory(int(40.5 * GIB), "resources.gpu_memory_gib")


def test_find_gpu_memory_reads_nvidia_smi(monkeypatch):
    monkeypatch.setattr("search.resources.shutil.which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr("search.resources.gpu_total_memory_mib", lambda: 81920)

    gpu = find_gpu_memory(_gpu_config(gpu_memory_gib=None))

    assert gpu == GpuMemory(80 * GIB, "nvidia-smi on this machine")


def test_find_gpu_memory_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr("search.resources.shutil.which", lambda name: None)

    gpu = find_gpu_memory(_gpu_config(gpu_memory_gib=None))

    assert gpu.total_bytes is None
    assert "no nvidia-smi" in gpu.source


def test_plan_keeps_packing_over_share():
    config = _gpu_config(gpus_per_trial=0.125)

    plan = plan_concurrency(config, [NodeResources(96, 8, 700 * GIB)], cache_bytes=0)

    assert plan.trials == 64
    assert plan.limited_by == "gpu"
    assert plan.gpu_memory.fits is False


def test_plan_gpu_check_uses_given_memory():
    config = _gpu_config(gpu_memory_gib=None)

    plan = plan_concurrency(config, [NodeResources(96, 8, 700 * GIB)], cache_bytes=0,
                            gpu_memory=GpuMemory(80 * GIB, "nvidia-smi on this machine"))
    unknown = plan_concurrency(config, [NodeResources(96, 8, 700 * GIB)], cache_bytes=0)

    assert plan.gpu_memory.share_bytes == 20 * GIB
    assert unknown.gpu_memory.share_bytes is None


def test_configured_limit_keeps_gpu_check():
    config = _config(space={"backbone": ["ResNet50"], "batch_size": [64]},
                     resources={"gpus_per_trial": 0.125, "gpu_memory_gib": 80}, search={"max_concurrent_trials": 3})

    plan = plan_concurrency(config, [NodeResources(96, 8, 700 * GIB)], cache_bytes=0)

    assert plan.limited_by == "configured"
    assert plan.gpu_memory.fits is False
