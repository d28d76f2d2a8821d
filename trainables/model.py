"""Build the classifier: backbone preprocessing, a ``keras.applications`` backbone and a sigmoid head.

The model takes float32 pixels in [0, 255] of shape (batch, size, size, 3) and returns the probability of
the positive class, shape (batch, 1). Preprocessing is a layer inside the model, so an exported model
needs nothing but raw pixels.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from trainables.backbones import CAFFE_MEAN_BGR, BackboneSpec, WeightsUnavailableError, get_backbone
from trainables.gpu import gpu_total_memory_mib

__all__ = ["BackbonePreprocessing", "Classifier", "GpuMemoryPlan", "WeightsUnavailableError", "build_classifier",
           "compile_classifier", "configure_tensorflow", "gpu_total_memory_mib", "plan_gpu_memory", "resolve_weights",
           "set_precision_policy", "set_unfrozen_layers"]

logger = logging.getLogger(__name__)

BACKBONE_LAYER_NAME = "backbone"
SCRATCH_BATCHNORM_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="lesiontune")
class BackbonePreprocessing(layers.Layer):
    """Map pixels in [0, 255] to what a backbone expects: ``caffe``, ``tf`` ([-1, 1]) or ``none``."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "none"):
            raise ValueError(f"Invalid preprocessing mode {mode!r}: expected 'caffe', 'tf' or 'none'.")
        self.mode = mode

    def call(self, inputs):
        if self.mode == "tf":
            return inputs / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = keras.ops.flip(inputs, axis=-1)
            return bgr - keras.ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=inputs.dtype)
        return inputs

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class Classifier:
    """A built model and the facts needed to change its trainability."""

    model: keras.Model
    backbone: keras.Model
    spec: BackboneSpec
    pretrained: bool


def resolve_weights(spec: BackboneSpec, weights: str, image_size: int) -> str | None:
    """Turn the ``weights`` setting into the argument of the Keras constructor.

    ``"imagenet"`` downloads the weights or reuses ``~/.keras/models``, and ``"none"`` is random initialisation.
    Any other value is a folder with the no-top weight files under the names keras.applications gives them.
    """
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise ValueError(f"Invalid weights {weights!r}: expected 'imagenet', 'none' or a folder of weight files.")
    path = folder / spec.weights_file_for(image_size)
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file {path.name} for {spec.name} not found in {folder}. On a machine with network access, run "
            f"'lesiontune weights download DIR --backbones {spec.name} --image-size {image_size}' and copy DIR's "
            "files there."
        )
    return str(path)


def _construct_backbone(spec: BackboneSpec, weights: str | None, image_size: int) -> keras.Model:
    constructor = getattr(keras.applications, spec.constructor)
    kwargs = {"include_top": False, "weights": weights, "input_shape": (image_size, image_size, 3)}
    if spec.preprocessing == "none":
        kwargs["include_preprocessing"] = True
    try:
        return constructor(**kwargs)
    except Exception as error:  # Keras raises a plain Exception("URL fetch failure on ...") when a download fails.
        if weights != "imagenet" or not _is_download_failure(error):
            raise
        raise WeightsUnavailableError(
            f"Cannot download the ImageNet weights of {spec.name} ({error}). This machine has no network access "
            "and the file is not in ~/.keras/models. Use --weights none to train from scratch, or --weights DIR "
            "with a folder of pre-downloaded weight files."
        ) from error


def _is_download_failure(error: BaseException) -> bool:
    return isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError)) or "fetch failure" in str(error)


def build_classifier(
    *, backbone: str, image_size: int, weights: str = "none", dropout: float = 0.2, seed: int | None = None
) -> Classifier:
    """Build preprocessing, backbone, global average pooling, dropout and one sigmoid unit.

    With pretrained weights the backbone is called in inference mode, so its BatchNormalization layers
    keep their statistics whatever is unfrozen. From scratch (``weights="none"``) the whole network
    trains, BatchNormalization included, with momentum 0.9: with the Keras default of 0.99 to 0.999 the
    moving statistics lag so far behind in a short run that validation predictions stay constant.
    """
    spec = get_backbone(backbone)
    if image_size < spec.min_image_size:
        raise ValueError(f"Image size {image_size} px is below {spec.name}'s minimum of {spec.min_image_size} px.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout {dropout!r}: expected a rate in [0, 1).")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    keras_weights = resolve_weights(spec, weights, image_size)
    pretrained = keras_weights is not None

    base = _construct_backbone(spec, keras_weights, image_size)
    base.name = BACKBONE_LAYER_NAME
    if not pretrained:
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = SCRATCH_BATCHNORM_MOMENTUM

    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    x = BackbonePreprocessing(spec.preprocessing, name="preprocessing")(inputs)
    x = base(x, training=False) if pretrained else base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="melanoma_probability")(x)
    model = keras.Model(inputs, outputs, name=f"lesiontune_{spec.name}")
    return Classifier(model=model, backbone=base, spec=spec, pretrained=pretrained)


def set_unfrozen_layers(classifier: Classifier, unfrozen_layers: int) -> int:
    """Make the top ``unfrozen_layers`` weight layers of a pretrained backbone trainable; return how many.

    Weight layers are convolutions and dense layers; BatchNormalization layers stay frozen and are not
    counted, so a depth means the same thing for every backbone. ``-1`` unfreezes every weight layer.
    A model built from scratch trains entirely, whatever the depth. Recompile the model afterwards.
    """
    base = classifier.backbone
    if not classifier.pretrained:
        base.trainable = True
        for layer in base.layers:
            layer.trainable = True
        return classifier.spec.weight_layers

    weight_layers = [l for l in base.layers if l.weights and not isinstance(l, layers.BatchNormalization)]
    count = len(weight_layers) if unfrozen_layers < 0 else min(unfrozen_layers, len(weight_layers))
    base.trainable = count > 0
    for layer in base.layers:
        layer.trainable = False
    for layer in weight_layers[len(weight_layers) - count:]:
        layer.trainable = True
    return count


def compile_classifier(classifier: Classifier, *, learning_rate: float, jit_compile: bool | str = "auto") -> None:
    """Compile with Adam and binary cross-entropy; call again whenever trainability changes.

    ``jit_compile`` is passed to ``keras.Model.compile``: ``"auto"`` lets Keras decide, True or False
    forces XLA compilation of the train step on or off.
    """
    classifier.model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        jit_compile=jit_compile,
    )


def set_precision_policy(*, mixed_precision: bool) -> None:
    """Set the Keras global dtype policy before a model is built: ``mixed_float16`` or ``float32``.

    The policy is set either way, so a worker process that runs several trials does not carry one
    trial's policy into the next. The sigmoid head computes in float32 under both policies.
    """
    policy = "mixed_float16" if mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    logger.info("Keras dtype policy: %s", policy)


@dataclass(frozen=True)
class GpuMemoryPlan:
    """GPU memory setting of a trial: ``growth``, a ``limit`` in MiB, or ``default`` (TensorFlow reserves it all)."""

    mode: str
    limit_mib: int | None = None


def plan_gpu_memory(*, gpus_per_trial: float, total_memory_mib: int | None,
                    memory_growth: bool = True) -> GpuMemoryPlan:
    """Choose the GPU memory setting of a trial.

    A trial with a fraction of one GPU (0 < ``gpus_per_trial`` < 1) gets that fraction of the GPU's
    ``total_memory_mib`` as a hard limit, so trials packed on one GPU cannot take each other's memory.
    Whole GPUs, and fractions whose GPU memory is unknown, use memory growth when ``memory_growth`` is set.
    """
    if 0 < gpus_per_trial < 1 and total_memory_mib:
        return GpuMemoryPlan("limit", max(1, int(total_memory_mib * gpus_per_trial)))
    return GpuMemoryPlan("growth") if memory_growth else GpuMemoryPlan("default")


def configure_tensorflow(*, cpus: int, gpu_memory_growth: bool = True,
                         gpus_per_trial: float = 0.0) -> GpuMemoryPlan | None:
    """Limit TensorFlow to the trial's CPUs and configure GPU memory, before any op runs.

    Returns the GPU memory plan that was applied, or None when TensorFlow finds no GPU.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    except RuntimeError:
        logger.debug("TensorFlow was already initialised in this process; thread limits unchanged.")
    gpus = tf.config.list_physical_devices("GPU")
    logger.debug("TensorFlow sees GPUs %s (CUDA_VISIBLE_DEVICES=%s)", gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not gpus:
        return None

    fractional = 0 < gpus_per_trial < 1
    total_memory_mib = gpu_total_memory_mib() if fractional else None
    if fractional and total_memory_mib is None:
        logger.warning("The GPU's memory is unknown, so this trial runs without a memory limit and the trials "
                       "packed on its GPU (%s GPUs each) can take each other's memory.", gpus_per_trial)
    plan = plan_gpu_memory(gpus_per_trial=gpus_per_trial, total_memory_mib=total_memory_mib,
                           memory_growth=gpu_memory_growth)
    # NOTE: this branch has run only with TensorFlow mocked, because the test machine has no GPU. The limit
    # covers TensorFlow's allocator only, so the CUDA context of each packed trial comes on top of its share.
    for gpu in gpus:
        try:
            if plan.mode == "limit":
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=plan.limit_mib)])
            elif plan.mode == "growth":
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            logger.debug("GPU %s was already initialised; memory settings unchanged.", gpu.name)
    logger.info("GPU memory: %s%s for %s GPUs per trial", plan.mode,
                f" of {plan.limit_mib} MiB" if plan.limit_mib else "", gpus_per_trial)
    return plan
