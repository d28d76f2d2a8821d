"""Facts about the supported ``keras.applications`` backbones.

This module imports no TensorFlow, so the search-space validation in ``spaces`` can read minimum input
sizes and layer counts without starting TensorFlow. The Keras constructors are looked up by name when a
model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKBONES", "BackboneSpec", "WeightsUnavailableError", "get_backbone"]

# Per-channel means (BGR order) that "caffe"-mode preprocessing subtracts, as in keras.applications.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were requested but cannot be loaded (no network and no cached file)."""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its Keras constructor, the preprocessing it expects, and its size facts.

    ``preprocessing`` is what the model applies to input pixels in [0, 255] before the backbone:
    ``"caffe"`` (RGB to BGR, subtract the ImageNet means), ``"tf"`` (scale to [-1, 1]) or ``"none"``
    (the backbone rescales inside itself, as EfficientNetV2 does with ``include_preprocessing=True``).
    ``weight_layers`` is the number of layers with trainable weights other than BatchNormalization
    (convolutions and dense layers). An unfrozen depth counts these layers. ``parameters`` is the
    backbone's weight count without the top, and ``activations`` the number of values that its layers
    output for one 224 x 224 image (the sum over layers), which sets the memory that training needs per
    image. All four are counted on Keras 3.15.
    """

    name: str
    constructor: str
    preprocessing: str
    min_image_size: int
    weight_layers: int
    weights_file: str  # file name of the no-top ImageNet weights as keras.applications downloads them
    parameters: int = 0
    activations: int = 0

    def weights_file_for(self, image_size: int) -> str:
        """Return the no-top weights file name; MobileNetV2 has one file per input size."""
        if self.name == "MobileNetV2":
            rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
            return self.weights_file.format(rows=rows)
        return self.weights_file


def _efficientnet_v2(suffix: str, weight_layers: int, parameters: int, activations: int) -> BackboneSpec:
    return BackboneSpec(f"EfficientNetV2{suffix}", f"EfficientNetV2{suffix}", "none", 32, weight_layers,
                        f"efficientnetv2-{suffix.lower()}_notop.h5", parameters, activations)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("VGG16", "VGG16", "caffe", 32, 13, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     14_714_688, 15_077_888),
        BackboneSpec("ResNet50", "ResNet50", "caffe", 32, 53, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     23_587_712, 36_966_636),
        BackboneSpec("Xception", "Xception", "tf", 71, 40, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     20_861_480, 34_418_592),
        BackboneSpec("MobileNetV2", "MobileNetV2", "tf", 32, 52,
                     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5", 2_257_984, 21_663_152),
        BackboneSpec("InceptionV3", "InceptionV3", "tf", 75, 94,
                     "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 21_802_784, 16_582_032),
        _efficientnet_v2("B0", 91, 5_919_312, 16_014_224),
        _efficientnet_v2("B1", 111, 6_931_124, 21_276_884),
        _efficientnet_v2("B2", 116, 8_769_374, 22_996_686),
        _efficientnet_v2("B3", 136, 12_930_622, 28_749_318),
        _efficientnet_v2("S", 170, 20_331_360, 41_823_992),
        _efficientnet_v2("M", 245, 53_150_388, 67_984_076),
        _efficientnet_v2("L", 339, 117_746_848, 119_880_576),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """Return the spec of backbone ``name``, or raise ValueError listing the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}.") from None
