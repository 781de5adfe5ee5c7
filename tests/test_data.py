import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training.config import NiNConfig
from tests.conftest import REAL_DATA, make_fashion_mnist


def test_reads_gzip_idx_files_through_torchvision(tiny_data):
    root = data.find_data_root(tiny_data, allow_download=False)
    x, y = data.load_split(root, train=True)
    assert x.shape == (64, 28, 28) and x.dtype == torch.uint8
    assert y.tolist() == [i % 10 for i in range(64)]
    xt, _ = data.load_split(root, train=False)
    assert xt.shape == (32, 28, 28)


def test_reads_plain_idx_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    folder = make_fashion_mnist(tmp_path / "plain", compress=False)
    x, _ = data.load_split(data.find_data_root(folder, allow_download=False), train=False)
    assert x.shape == (32, 28, 28)


def test_search_order_data_dir_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    a = make_fashion_mnist(tmp_path / "a", n_train=20)
    b = make_fashion_mnist(tmp_path / "b", n_train=30)
    monkeypatch.setenv(data.ENV_VAR, str(b))
    n = lambda root: len(data.load_split(root, train=True)[0])  # noqa: E731
    assert n(data.find_data_root(a, allow_download=False)) == 20
    assert n(data.find_data_root(None, allow_download=False)) == 30


def test_missing_data_names_every_place_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "no-env"))
    with pytest.raises(data.DataNotFoundError) as e:
        data.find_data_root(None, allow_download=False)
    msg = str(e.value)
    for place in ("no-env", "no-debian", "apt-get install dataset-fashion-mnist", "--data-dir"):
        assert place in msg


def test_a_named_data_dir_must_hold_the_data_no_fall_through(tmp_path, monkeypatch):
    """`--data-dir /no/such/folder` used to train on the Debian copy without a word."""
    monkeypatch.setenv(data.ENV_VAR, str(make_fashion_mnist(tmp_path / "elsewhere")))
    with pytest.raises(data.DataNotFoundError, match="--data-dir /no/such/folder does not exist"):
        data.find_data_root("/no/such/folder", allow_download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataNotFoundError, match="does not hold the four Fashion-MNIST IDX files"):
        data.find_data_root(tmp_path / "empty", allow_download=False)


def test_a_failed_download_is_reported_with_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "FashionMNIST", offline)
    with pytest.raises(data.DataNotFoundError, match="torchvision download.*network unreachable"):
        data.find_data_root(None)


def test_training_resize_equals_what_an_uploader_sends():
    """Training resizes on the device with torch; a client resizes with PIL. Same pixels."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    cfg = NiNConfig()
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), dtype=np.float32)
    x = data.to_model_input(torch.from_numpy(img)[None], cfg)[0, 0].numpy()
    ours = x * cfg.std + cfg.mean
    assert np.abs(ours * 255 - pil).max() <= 1.0 + 1e-3  # within one grey level (rounding)
    assert np.abs(ours * 255 - pil).mean() < 0.25  # PIL rounds its fixed-point weights differently


def test_augmentation_keeps_shape_and_content():
    x = torch.zeros(64, 28, 28, dtype=torch.uint8)
    x[:, 10:18, 3:8] = 200  # an off-centre patch: a flip moves it to the right
    out = data.random_crop_flip(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert ((out == 200).sum((1, 2)) == 40).all()  # 2-pixel shifts never push the patch out
    right = (out[:, :, 14:] == 200).any(2).any(1)
    assert 10 < right.sum() < 54  # about half flipped


@REAL_DATA
def test_real_debian_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    root = data.find_data_root(data.DEBIAN_DIR, allow_download=False)
    x, y = data.load_split(root, train=False)
    assert x.shape == (10_000, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10
    xtr, _ = data.load_split(root, train=True)
    assert len(xtr) == 60_000
    mean = xtr.float().mean().item() / 255
    assert abs(mean - NiNConfig().mean) < 1e-3  # the normalization constants are the data's
