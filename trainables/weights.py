"""Download the no-top ImageNet weight files of the backbones, for machines without network access.

The files are fetched from the URLs that ``keras.applications`` (Keras 3.15) downloads from, checked
against the same MD5 hashes, and stored under the same names, so a folder filled here works as
``--weights DIR`` on an air-gapped cluster.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from trainables.backbones import BACKBONES, WeightsUnavailableError, get_backbone

__all__ = ["WEIGHTS_BASE_URL", "download_weights", "weights_origin"]

logger = logging.getLogger(__name__)

WEIGHTS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# Folder under WEIGHTS_BASE_URL and MD5 hash of each no-top file, from keras/src/applications/*.py in Keras 3.15.
# Keras publishes no hash for the MobileNetV2 files, so those are not checked.
_NO_TOP_SOURCES: dict[str, tuple[str, str | None]] = {
    "VGG16": ("vgg16", "6d6bbae143d832006294945121d1f1fc"),
    "ResNet50": ("resnet", "4d473c1dd8becc155b73f8504c6f6626"),
    "Xception": ("xception", "b0042744bf5b25fce3cb969f33bebb97"),
    "MobileNetV2": ("mobilenet_v2", None),
    "InceptionV3": ("inception_v3", "bcbd6486424b2319ff4ef7d526e38f63"),
    "EfficientNetV2B0": ("efficientnet_v2", "893217f2bb855e2983157299931e43ff"),
    "EfficientNetV2B1": ("efficientnet_v2", "0e80663031ca32d657f9caa404b6ec37"),
    "EfficientNetV2B2": ("efficientnet_v2", "1dfe2e7a5d45b6632553a8961ea609eb"),
    "EfficientNetV2B3": ("efficientnet_v2", "f6abf7b5849ac99a89b50dd3fd532856"),
    "EfficientNetV2S": ("efficientnet_v2", "af0682fb74e8c54910f2d4393339c070"),
    "EfficientNetV2M": ("efficientnet_v2", "1b8dc055df72dde80d614482840fe342"),
    "EfficientNetV2L": ("efficientnet_v2", "b0b66b5c863aef5b46e8608fe1711615"),
}


def weights_origin(name: str, image_size: int = 224) -> tuple[str, str, str | None]:
    """Return ``(file name, URL, MD5 hash or None)`` of backbone ``name``'s no-top ImageNet weights.

    ``image_size`` in pixels only matters for MobileNetV2, which has one file per input size.
    """
    spec = get_backbone(name)
    folder, file_hash = _NO_TOP_SOURCES[spec.name]
    file_name = spec.weights_file_for(image_size)
    return file_name, f"{WEIGHTS_BASE_URL}{folder}/{file_name}", file_hash


def download_weights(directory: str | os.PathLike, *, backbones: Sequence[str] | None = None,
                     image_size: int = 224) -> list[Path]:
    """Download the no-top ImageNet weights of ``backbones`` (default: all) into ``directory``.

    A file already present with the right hash is kept, so an interrupted download can be rerun.

    Args:
        directory: folder to fill; created if missing.
        backbones: names from ``BACKBONES``, or None for every backbone.
        image_size: input size in pixels, >= 32, that picks the MobileNetV2 file (96, 128, 160, 192 or 224;
            other sizes use the 224 file, as ``resolve_weights`` does).

    Returns:
        The paths of the weight files, one per backbone, in the order given.

    Raises:
        ValueError: for an unknown backbone or an invalid image size.
        WeightsUnavailableError: when a download fails or a file does not match its hash.
    """
    from keras.utils import get_file

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"Invalid image size {image_size!r}: expected an integer number of pixels >= 32, such as 224.")
    names = list(BACKBONES) if backbones is None else list(dict.fromkeys(backbones))
    sources = {name: weights_origin(name, image_size) for name in names}
    folder = Path(directory).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)

    paths = []
    for name, (file_name, url, file_hash) in sources.items():
        logger.info("Fetching the ImageNet weights of %s from %s", name, url)
        try:
            path = get_file(file_name, url, file_hash=file_hash, cache_dir=str(folder), cache_subdir="")
        except Exception as error:  # Keras raises a plain Exception("URL fetch failure on ...") when a download fails.
            raise _download_error(name, url, error) from error
        paths.append(Path(path))
    return paths


def _download_error(name: str, url: str, error: Exception) -> WeightsUnavailableError:
    reason = " ".join(str(error).split())
    if "hash does not match" in reason:
        action = "Run the command again; if it fails again, the server returned a different file."
    else:
        action = ("Run 'lesiontune weights download DIR' on a machine with network access and copy DIR here, "
                  "or use --weights none to train from scratch.")
    return WeightsUnavailableError(f"Cannot download the ImageNet weights of {name} from {url} ({reason}). {action}")
