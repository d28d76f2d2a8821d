import pytest

from search.resources import (GIB, RUNTIME_BYTES, NodeResources, estimate_trial_memory, local_node, nodes_from_ray,
                              plan_concurrency)
from spaces.config import load_config


def _config(space=None, resources=None, search=None):
    overrides = {"space": {"backbone": ["MobileNetV2"], "image_size": [224], "batch_size": [32], **(space or {})}}
    overrides["resources"] = resources or {}
    overrides["search"] = search or {}
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
