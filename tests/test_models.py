"""evalfarm.models: the FID-InceptionV3 port, its preprocessing and its weights, checked against torch-fidelity 0.4.0.

The network runs on the seeded synthetic weights from conftest (canonical layout, random values): the
comparisons test that both implementations compute the same function, not that the numbers mean anything.
Only 20 images go through a network in this file (the forward pass is slow on the test machine's CPU).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evalfarm.errors import WeightsError
from evalfarm.models import FeatureExtractor, FIDInceptionV3, Weights, resolve_device, resolve_weights
from evalfarm.models import weights as weights_module
from evalfarm.models.resize import normalize, resize_clean_bicubic, resize_tf_bilinear
from evalfarm.models.weights import WEIGHTS_FILENAME, download_weights

N_IMAGES = 6


def without_batch_counters(keys: Iterator[str]) -> set[str]:
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def rel_max_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# --------------------------------------------------------------------------------------------------------------
# Shared, expensive objects: built once for the module
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Seeded uint8 NCHW batch at 32x32, so the TF bilinear upsampling is part of what is compared."""
    rng = np.random.RandomState(0)
    coarse = rng.randint(0, 256, size=(N_IMAGES, 3, 8, 8)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)  # blocky colour fields ...
    noisy = smooth + rng.normal(0, 20, size=smooth.shape)  # ... with pixel noise
    return torch.from_numpy(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def extractor(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    return FeatureExtractor(resolve_weights(weights_path, tmp_path_factory.mktemp("cache")), "cpu")


@pytest.fixture(scope="module")
def torch_fidelity_extractor(weights_path: Path) -> FeatureExtractorInceptionV3:
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
    )


@pytest.fixture(scope="module")
def our_pool3(extractor: FeatureExtractor, images: torch.Tensor) -> np.ndarray:
    return extractor(images)


@pytest.fixture(scope="module")
def their_features(torch_fidelity_extractor: FeatureExtractorInceptionV3, images: torch.Tensor) -> dict:
    with torch.no_grad():
        pool3, logits = torch_fidelity_extractor(images)
    return {"2048": pool3.numpy(), "logits_unbiased": logits.numpy()}


# --------------------------------------------------------------------------------------------------------------
# Network layout and numerics
# --------------------------------------------------------------------------------------------------------------


def test_network_loads_the_canonical_layout_strictly(weights_path: Path) -> None:
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    net = FIDInceptionV3()
    net.load_state_dict(state, strict=True)
    loaded = net.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_network_state_dict_keys_equal_torch_fidelity_extractor_keys(
    torch_fidelity_extractor: FeatureExtractorInceptionV3, weights_path: Path
) -> None:
    ours = without_batch_counters(FIDInceptionV3().state_dict().keys())
    theirs = without_batch_counters(torch_fidelity_extractor.state_dict().keys())
    assert ours == theirs
    assert without_batch_counters(torch.load(weights_path, weights_only=True).keys()) == theirs


def test_extractor_returns_float32_pool3_per_image(our_pool3: np.ndarray) -> None:
    assert our_pool3.shape == (N_IMAGES, 2048)
    assert our_pool3.dtype == np.float32
    assert np.all(np.isfinite(our_pool3)) and np.all(our_pool3 >= 0)  # average of ReLU outputs
    assert np.unique(our_pool3, axis=0).shape[0] == N_IMAGES  # different images, different features


def test_network_in_contiguous_layout_is_bit_exact_with_torch_fidelity(
    weights_path: Path, images: torch.Tensor, their_features: dict
) -> None:
    # The port computes torch-fidelity's graph operation for operation: same layout, same bits on CPU.
    net = FIDInceptionV3()
    net.load_state_dict(torch.load(weights_path, weights_only=True))
    net.eval().requires_grad_(False)
    with torch.no_grad():
        pool3, _ = net(normalize(resize_tf_bilinear(images[:2].float())))
    assert torch.equal(pool3, torch.from_numpy(their_features["2048"][:2]))


def test_pool3_features_equal_torch_fidelity(our_pool3: np.ndarray, their_features: dict) -> None:
    # The extractor runs the fused graph (models/fused.py) channels-last, whose CPU convolution kernels round
    # differently from torch-fidelity's contiguous ones. On the synthetic weights this moves pool3 by 1.2e-5
    # of max |pool3| (observed), about as far as float32 itself is from a float64 forward pass (1.0e-5 for
    # both graphs): rounding, not a different function. 3e-5 bounds it with a margin.
    assert rel_max_diff(our_pool3, their_features["2048"]) < 3e-5


def test_logits_from_pool3_equal_torch_fidelity_unbiased_logits(
    extractor: FeatureExtractor, our_pool3: np.ndarray, their_features: dict
) -> None:
    logits = extractor.logits(our_pool3)
    assert logits.shape == (N_IMAGES, 1008)
    assert logits.dtype == np.float64
    # Inherits the pool3 rounding above (observed 9.0e-6).
    assert rel_max_diff(logits, their_features["logits_unbiased"].astype(np.float64)) < 3e-5


def test_logits_of_the_same_pool3_equal_torch_fidelity_to_float32_rounding(
    extractor: FeatureExtractor, their_features: dict
) -> None:
    # Same pool3 in: the only difference left is float64 (ours) against float32 (theirs) in the product.
    logits = extractor.logits(their_features["2048"])
    assert rel_max_diff(logits, their_features["logits_unbiased"].astype(np.float64)) < 2e-6


def test_pool3_of_an_image_does_not_depend_on_its_batch(
    extractor: FeatureExtractor, images: torch.Tensor, our_pool3: np.ndarray
) -> None:
    split = np.concatenate([extractor(images[:1]), extractor(images[1:])])
    # Observed bit-exact on CPU (2 threads, this torch build); 1e-6 relative keeps the test valid on CPUs whose
    # kernels pick another blocking per batch size, while any real batch dependence (BatchNorm in training
    # mode, padding across images) would be orders of magnitude larger.
    assert rel_max_diff(split, our_pool3) <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 48), (512, 512)])
def test_tf_bilinear_resize_is_bit_exact_with_torch_fidelity(height: int, width: int) -> None:
    g = torch.Generator().manual_seed(height * 1000 + width)
    x = torch.rand(2, 3, height, width, generator=g) * 255
    expected = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    out = resize_tf_bilinear(x)
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_tf_bilinear_resize_is_identity_at_299() -> None:
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 255
    assert torch.equal(resize_tf_bilinear(x), x)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (400, 512)])
def test_clean_bicubic_resize_equals_pil_float_bicubic_per_channel(height: int, width: int) -> None:
    image = np.random.RandomState(height + width).randint(0, 256, size=(height, width, 3)).astype(np.uint8)
    out = resize_clean_bicubic(image)
    unclipped = np.stack(
        [
            np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
            for c in range(3)
        ]
    )
    assert unclipped.min() < 0 or unclipped.max() > 255  # noise makes bicubic overshoot: the clip is exercised
    assert out.shape == (3, 299, 299) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.clip(unclipped, 0, 255))


# --------------------------------------------------------------------------------------------------------------
# Weights: finding, verifying, loading
# --------------------------------------------------------------------------------------------------------------


def test_missing_weights_file_error_says_how_to_provide_one(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        resolve_weights("/nonexistent.pth", tmp_path)
    message = str(info.value)
    assert "/nonexistent.pth" in message and "EVALFARM_WEIGHTS" in message and "--weights" in message


def test_no_path_no_cache_and_no_download_raises(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="EVALFARM_WEIGHTS"):
        resolve_weights(None, tmp_path, allow_download=False)


def test_cached_weights_are_used_without_downloading(tmp_path: Path) -> None:
    cached = tmp_path / WEIGHTS_FILENAME
    cached.write_bytes(b"not checked here")
    weights = resolve_weights(None, tmp_path, allow_download=False)
    assert weights.path == cached
    assert weights.sha256 == hashlib.sha256(b"not checked here").hexdigest()


def test_synthetic_weights_are_not_canonical(weights_path: Path, tmp_path: Path) -> None:
    weights = resolve_weights(weights_path, tmp_path)
    assert weights.sha256 == hashlib.sha256(weights_path.read_bytes()).hexdigest()
    assert not weights.canonical


def test_weights_with_the_published_hash_prefix_are_canonical() -> None:
    assert Weights(Path("any.pth"), "6726825d" + "0" * 56).canonical


def test_download_from_an_unreachable_url_fails_fast(tmp_path: Path) -> None:
    dest = tmp_path / "weights" / WEIGHTS_FILENAME
    start = time.monotonic()
    with pytest.raises(WeightsError, match="127.0.0.1:9"):
        download_weights(dest, urls=("http://127.0.0.1:9/none.pth",))
    assert time.monotonic() - start < 10
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temporary file left behind


@pytest.fixture
def served_file(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A random 4 KiB file served over HTTP on 127.0.0.1 (a free port); yields (url, content)."""
    root = tmp_path / "served"
    root.mkdir()
    content = np.random.RandomState(3).bytes(4096)
    (root / "fake.pth").write_bytes(content)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fake.pth", content
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_with_the_wrong_hash_is_rejected_and_not_kept(served_file: tuple[str, bytes], tmp_path: Path) -> None:
    url, content = served_file
    sha = hashlib.sha256(content).hexdigest()
    assert not sha.startswith("6726825d")
    dest = tmp_path / "weights" / WEIGHTS_FILENAME
    with pytest.raises(WeightsError) as info:
        download_weights(dest, urls=(url,))
    assert sha in str(info.value) and "6726825d" in str(info.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_falls_back_to_the_next_url_and_moves_the_verified_file_into_place(
    served_file: tuple[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, content = served_file
    sha = hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(weights_module, "CANONICAL_SHA256_PREFIX", sha[:8])  # make the served file "canonical"
    dest = tmp_path / "weights" / WEIGHTS_FILENAME
    weights = download_weights(dest, urls=("http://127.0.0.1:9/none.pth", url))
    assert weights == Weights(dest, sha)
    assert dest.read_bytes() == content
    assert list(dest.parent.iterdir()) == [dest]


def test_a_file_that_is_not_a_torch_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.RandomState(4).bytes(1000))
    with pytest.raises(WeightsError, match="garbage.pth"):
        FeatureExtractor(resolve_weights(path, tmp_path), "cpu")


def test_a_torch_file_without_a_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match="state dict"):
        FeatureExtractor(resolve_weights(path, tmp_path), "cpu")


def test_a_state_dict_of_another_network_is_rejected_naming_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(WeightsError) as info:
        FeatureExtractor(resolve_weights(path, tmp_path), "cpu")
    message = str(info.value)
    assert "missing keys" in message and "Conv2d_1a_3x3" in message and "'a'" in message


def test_a_state_dict_with_wrong_shapes_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wrong-shape.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, path)
    with pytest.raises(WeightsError, match="fc.weight"):
        FeatureExtractor(resolve_weights(path, tmp_path), "cpu")


# --------------------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_device("cuda")


def test_auto_device_picks_cuda_only_when_present() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_explicit_cpu_device_is_honoured() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
