"""Downloading backbone weights for --weights DIR, against a mock HTTP server on 127.0.0.1."""

import functools
import hashlib
import http.server
import socket
import threading

import h5py
import keras
import numpy as np
import pytest

from search.cli import main
from trainables import weights as weights_module
from trainables.backbones import BACKBONES, WeightsUnavailableError
from trainables.model import build_classifier
from trainables.weights import download_weights, weights_origin


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Serve tmp_path/server over HTTP on 127.0.0.1 and point the weights origin at it."""
    root = tmp_path / "server"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(weights_module, "WEIGHTS_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    yield root
    server.shutdown()
    server.server_close()


def _publish(root, monkeypatch, name: str, write, image_size: int = 224):
    """Write backbone ``name``'s weights file into the served folder with ``write(path)`` and register its MD5."""
    _, url, _ = weights_origin(name, image_size)
    relative = url.split("/", 3)[3].removeprefix("tensorflow/keras-applications/")
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    folder, _ = weights_module._NO_TOP_SOURCES[name]
    monkeypatch.setitem(weights_module._NO_TOP_SOURCES, name, (folder, hashlib.md5(path.read_bytes()).hexdigest()))
    return path


def _write_small_hdf5(path):
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = np.array([b"block1_conv1"])
        file.create_dataset("block1_conv1/kernel", data=np.arange(12, dtype=np.float32).reshape(3, 4))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_weights_origin_matches_keras_names():
    name, url, file_hash = weights_origin("EfficientNetV2B0")
    assert name == "efficientnetv2-b0_notop.h5"
    assert url == "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-b0_notop.h5"
    assert file_hash == "893217f2bb855e2983157299931e43ff"
    assert weights_origin("MobileNetV2", 128)[0] == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5"
    assert set(weights_module._NO_TOP_SOURCES) == set(BACKBONES)


def test_download_weights_stores_keras_name(served, monkeypatch, tmp_path):
    source = _publish(served, monkeypatch, "VGG16", _write_small_hdf5)
    paths = download_weights(tmp_path / "weights", backbones=["VGG16"])
    assert [p.name for p in paths] == [BACKBONES["VGG16"].weights_file]
    assert paths[0].parent == (tmp_path / "weights").resolve()
    assert paths[0].read_bytes() == source.read_bytes()
    with h5py.File(paths[0]) as file:
        assert file["block1_conv1/kernel"].shape == (3, 4)


def test_download_weights_hash_mismatch(served, monkeypatch, tmp_path):
    _publish(served, monkeypatch, "VGG16", _write_small_hdf5)
    monkeypatch.setitem(weights_module._NO_TOP_SOURCES, "VGG16", ("vgg16", "0" * 32))
    with pytest.raises(WeightsUnavailableError, match="weights of VGG16 .*hash does not match"):
        download_weights(tmp_path / "weights", backbones=["VGG16"])


def test_weights_download_offline_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(weights_module, "WEIGHTS_BASE_URL", f"http://127.0.0.1:{_closed_port()}/")
    status = main(["weights", "download", str(tmp_path / "weights"), "--backbones", "ResNet50"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith("lesiontune: error: Cannot download the ImageNet weights of ResNet50 from http://127.0.0.1")
    assert "lesiontune weights download DIR' on a machine with network access" in err
    assert "--weights none" in err
    assert "Traceback" not in err


def test_weights_download_unknown_backbone(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["weights", "download", str(tmp_path), "--backbones", "ResNet5"])
    assert "invalid choice: 'ResNet5'" in capsys.readouterr().err


def test_weights_folder_builds_each_backbone(served, monkeypatch, tmp_path, capsys):
    sources = {}
    for name in ("MobileNetV2", "EfficientNetV2B0"):
        model = getattr(keras.applications, name)(include_top=False, weights=None, input_shape=(32, 32, 3))
        # keras.applications files are legacy HDF5; saving a whole model as .h5 writes that format.
        _publish(served, monkeypatch, name, model.save, image_size=32)
        sources[name] = model
    folder = tmp_path / "weights"

    status = main(["weights", "download", str(folder), "--backbones", *sources, "--image-size", "32"])
    assert status == 0
    assert "2 weight files in" in capsys.readouterr().out
    for name, source in sources.items():
        classifier = build_classifier(backbone=name, image_size=32, weights=str(folder))
        assert classifier.pretrained
        built = [w for layer in classifier.backbone.layers for w in layer.get_weights()]
        expected = [w for layer in source.layers for w in layer.get_weights()]
        assert len(built) == len(expected)
        assert all(np.allclose(a, b) for a, b in zip(built, expected)), name
