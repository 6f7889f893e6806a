"""evalfarm.models.extractors: DINOv2, CLIP and VGG16 features equal torch-fidelity 0.4.0's on the same weights.

The networks run on seeded synthetic weights in each canonical layout (`evalfarm.models.synthetic_extractors`):
the comparisons test that both implementations compute the same function, not that the numbers mean anything.
torch-fidelity reads the VGG16 and CLIP files itself; its DINOv2 extractor takes its network from torch.hub,
which cannot run offline, so it is handed an independent network built from the same file (timm's ViT, or the
hub's own code from a local checkout named by EVALFARM_DINOV2_HUB_DIR) and everything else is its own.
Full networks run for the smallest member of each family (ViT-S/14, CLIP ViT-B/32, VGG16) on a few images;
the larger members are checked for layout, and ViT-g's SwiGLU and CLIP-L/14's shapes on two-block towers.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch_fidelity import feature_extractor_clip, feature_extractor_dinov2
from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evalfarm.errors import WeightsError
from evalfarm.models import clip, dinov2
from evalfarm.models.extractors import (
    EXTRACTORS,
    ImageFeatureExtractor,
    build,
    download_extractor_weights,
    get_spec,
    load_extractor_weights,
    preprocess,
    resolve_extractor_weights,
)
from evalfarm.models.synthetic_extractors import (
    make_clip_state,
    make_dinov2_state,
)
from evalfarm.models.weights import file_sha256
from evalfarm.settings import Settings

#: The normalization constants as written in torch-fidelity's extractor files.
TORCH_FIDELITY_NORMALIZATION = {
    "dinov2": ((255 * 0.485, 255 * 0.456, 255 * 0.406), (255 * 0.229, 255 * 0.224, 255 * 0.225)),
    "vgg16": ((255 * 0.485, 255 * 0.456, 255 * 0.406), (255 * 0.229, 255 * 0.224, 255 * 0.225)),
    "clip": (
        (255 * 0.48145466, 255 * 0.4578275, 255 * 0.40821073),
        (255 * 0.26862954, 255 * 0.26130258, 255 * 0.27577711),
    ),
}
TORCH_FIDELITY_CLASSES = {
    "dinov2": FeatureExtractorDinoV2,
    "clip": FeatureExtractorCLIP,
    "vgg16": FeatureExtractorVGG16,
}


def max_diffs(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max abs difference, max abs difference relative to the largest expected magnitude)."""
    diff = float(np.abs(actual - expected).max())
    return diff, diff / float(np.abs(expected).max())


def seeded_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Blocky colour fields with pixel noise, uint8 NCHW."""
    rng = np.random.RandomState(seed)
    coarse = rng.randint(0, 256, size=(n, 3, 4, 4)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((1, 1, -(-height // 4), -(-width // 4))))[:, :, :height, :width]
    return torch.from_numpy(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------
# Shared objects: seeded weight files and images, written once for the module
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.hub's checkpoint folder is one of the caches searched: keep a developer's real files out of the tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def dinov2_path(extractor_weights: Callable[[str], Path]) -> Path:
    return extractor_weights("dinov2-vit-s-14")


@pytest.fixture(scope="module")
def clip_path(extractor_weights: Callable[[str], Path]) -> Path:
    # The full OpenAI layout, text tower included: torch-fidelity must drop it as it does for the real file.
    return extractor_weights("clip-vit-b-32")


@pytest.fixture(scope="module")
def vgg16_path(extractor_weights: Callable[[str], Path]) -> Path:
    return extractor_weights("vgg16")


@pytest.fixture(scope="module")
def paths(dinov2_path: Path, clip_path: Path, vgg16_path: Path) -> dict[str, Path]:
    return {"dinov2-vit-s-14": dinov2_path, "clip-vit-b-32": clip_path, "vgg16": vgg16_path}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four images at 40x52: the TF1 bilinear upsampling, non-square, is part of every comparison."""
    return seeded_images(4, 40, 52, seed=0)


@pytest.fixture(scope="module")
def ours(paths: dict[str, Path]) -> dict[str, ImageFeatureExtractor]:
    return {name: build(name, path, "cpu") for name, path in paths.items()}


@pytest.fixture(scope="module")
def our_features(ours: dict[str, ImageFeatureExtractor], images: torch.Tensor) -> dict[str, np.ndarray]:
    return {name: extractor(images) for name, extractor in ours.items()}


def timm_dinov2(state: dict[str, torch.Tensor], model: str, **kwargs: object) -> torch.nn.Module:
    """timm's ViT on a hub DINOv2 state dict, its 37x37 position grid resampled as the hub code does it:
    bicubic at scale factor (16 + 0.1) / 37, without antialias (written out here, independently of ours)."""
    timm = pytest.importorskip("timm")
    net = timm.create_model(model, pretrained=False, img_size=224, num_classes=0, **kwargs).eval()
    converted = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        converted[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    pos = state["pos_embed"]
    grid = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic"
    )
    converted["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    net.load_state_dict(converted, strict=True)
    return net.requires_grad_(False)


def torch_fidelity_dinov2(monkeypatch: pytest.MonkeyPatch, network: torch.nn.Module) -> FeatureExtractorDinoV2:
    """torch-fidelity's DINOv2 extractor, its `torch.hub.load` answered with `network`."""
    monkeypatch.setenv("XFORMERS_DISABLED", "1")  # torch-fidelity sets it; restored after the test
    monkeypatch.setattr(feature_extractor_dinov2.torch.hub, "load", lambda repo, model, **kw: network)
    return FeatureExtractorDinoV2("dinov2-vit-s-14", ["dinov2"])


# --------------------------------------------------------------------------------------------------------------
# The registry agrees with torch-fidelity's own tables
# --------------------------------------------------------------------------------------------------------------


def test_registry_names_layers_and_sizes_are_torch_fidelity_s() -> None:
    for name, spec in EXTRACTORS.items():
        cls = TORCH_FIDELITY_CLASSES[spec.family]
        assert set(spec.layers) == set(cls.get_provided_features_list()), name
        for metric in ("isc", "fid", "kid", "prc"):
            assert cls.get_default_feature_layer_for_metric(metric) == spec.layer, (name, metric)
    assert set(feature_extractor_dinov2.MODEL_METADATA) == {n for n, s in EXTRACTORS.items() if s.family == "dinov2"}
    assert get_spec("dinov2-vit-s-14").input_size == FeatureExtractorDinoV2.INPUT_IMAGE_SIZE == 224
    assert get_spec("vgg16").input_size == FeatureExtractorVGG16.INPUT_IMAGE_SIZE == 224
    assert [get_spec(f"dinov2-vit-{s}-14").dim for s in "sblg"] == [384, 768, 1024, 1536]


def test_registry_weights_are_the_files_torch_fidelity_downloads() -> None:
    for name, spec in EXTRACTORS.items():
        if spec.family == "clip":
            assert spec.urls[0] == feature_extractor_clip.MODEL_URLS[name]
            assert spec.sha256 == feature_extractor_clip.MODEL_METADATA[name]["hash"]
            assert spec.weights_file == f"{name}-{spec.sha256}.pt"  # torch-fidelity's torch.hub cache name
        elif spec.family == "dinov2":
            stem = feature_extractor_dinov2.MODEL_METADATA[name]
            assert spec.urls == (f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth",)
            assert spec.sha256 is None
    vgg = get_spec("vgg16")
    assert vgg.urls[0] == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert vgg.weights_file == vgg.urls[0].rsplit("/", 1)[1] and vgg.sha256 == "397923af"
    assert get_spec("dinov2-vit-l-14").env_var == "EVALFARM_WEIGHTS_DINOV2_VIT_L_14"
    assert get_spec("clip-vit-b-32").env_var == "EVALFARM_WEIGHTS_CLIP_VIT_B_32"


def test_clip_registry_architecture_matches_its_resolution_and_dim() -> None:
    for spec in (s for s in EXTRACTORS.values() if s.family == "clip"):
        arch = clip.ARCHS[spec.arch]
        assert (arch.resolution, arch.embed_dim) == (spec.input_size, spec.dim)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing: the same resize and normalization as torch-fidelity, for any input size
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 52), (224, 224), (250, 230), (7, 500)])
@pytest.mark.parametrize("name", ["dinov2-vit-s-14", "clip-vit-b-32", "clip-vit-l-14-336px", "vgg16"])
def test_preprocessing_is_bit_exact_with_torch_fidelity(name: str, size: tuple[int, int]) -> None:
    spec = get_spec(name)
    mean, std = TORCH_FIDELITY_NORMALIZATION[spec.family]
    x = seeded_images(2, *size, seed=1)
    s = spec.input_size
    theirs = torchvision.transforms.functional.normalize(
        interpolate_bilinear_2d_like_tensorflow1x(x.to(torch.float32), size=(s, s), align_corners=False), mean, std
    )
    assert torch.equal(preprocess(x, spec), theirs)


# --------------------------------------------------------------------------------------------------------------
# Features equal torch-fidelity's on the same weights and images
# --------------------------------------------------------------------------------------------------------------


def test_features_are_float32_of_the_registry_width_and_differ_per_image(our_features: dict) -> None:
    for name, features in our_features.items():
        assert features.dtype == np.float32 and features.shape == (4, get_spec(name).dim), name
        assert np.all(np.isfinite(features)) and np.unique(features, axis=0).shape[0] == 4, name
        assert 0.1 < float(features.std()) < 10, name  # the seeded weights keep activations O(1)


def test_vgg16_equals_torch_fidelity_for_both_layers(
    vgg16_path: Path, images: torch.Tensor, our_features: dict
) -> None:
    theirs = FeatureExtractorVGG16("vgg16", ["fc2_relu", "fc2"], feature_extractor_weights_path=str(vgg16_path))
    with torch.no_grad():
        fc2_relu, fc2 = (t.numpy() for t in theirs(images))
    ours_fc2 = build("vgg16", vgg16_path, "cpu", layer="fc2")(images)
    assert max_diffs(our_features["vgg16"], fc2_relu)[1] <= 1e-6
    assert max_diffs(ours_fc2, fc2)[1] <= 1e-6
    assert (fc2 < 0).any() and np.array_equal(np.maximum(ours_fc2, 0), our_features["vgg16"])


def test_clip_equals_torch_fidelity_reading_the_torchscript_file(
    clip_path: Path, images: torch.Tensor, our_features: dict
) -> None:
    theirs = FeatureExtractorCLIP("clip-vit-b-32", ["clip"], feature_extractor_weights_path=str(clip_path))
    with torch.no_grad():
        (features,) = theirs(images)
    assert max_diffs(our_features["clip-vit-b-32"], features.numpy())[1] <= 1e-6


def test_dinov2_equals_torch_fidelity_around_timm_on_the_same_weights(
    monkeypatch: pytest.MonkeyPatch, dinov2_path: Path, images: torch.Tensor, our_features: dict
) -> None:
    network = timm_dinov2(torch.load(dinov2_path, weights_only=True), "vit_small_patch14_dinov2")
    theirs = torch_fidelity_dinov2(monkeypatch, network)
    with torch.no_grad():
        (features,) = theirs(images)
    assert max_diffs(our_features["dinov2-vit-s-14"], features.numpy())[1] <= 1e-5


def test_dinov2_equals_torch_fidelity_around_the_hub_code(
    monkeypatch: pytest.MonkeyPatch, dinov2_path: Path, images: torch.Tensor, our_features: dict
) -> None:
    hub_dir = os.environ.get("EVALFARM_DINOV2_HUB_DIR")  # a checkout of facebookresearch/dinov2
    if not hub_dir:
        pytest.skip("set EVALFARM_DINOV2_HUB_DIR to a facebookresearch/dinov2 checkout to compare with the hub code")
    monkeypatch.setenv("XFORMERS_DISABLED", "1")
    network = torch.hub.load(hub_dir, "dinov2_vits14", source="local", pretrained=False)
    network.load_state_dict(torch.load(dinov2_path, weights_only=True), strict=True)
    theirs = torch_fidelity_dinov2(monkeypatch, network)
    with torch.no_grad():
        (features,) = theirs(images)
    assert max_diffs(our_features["dinov2-vit-s-14"], features.numpy())[1] <= 1e-5


def test_dinov2_network_is_torch_fidelity_wrapped_around_our_own_network(
    monkeypatch: pytest.MonkeyPatch, dinov2_path: Path, images: torch.Tensor, our_features: dict
) -> None:
    # Without timm or the hub code, this still pins preprocessing, resize, normalization and output layer.
    network = build("dinov2-vit-s-14", dinov2_path, "cpu").net
    theirs = torch_fidelity_dinov2(monkeypatch, network)
    with torch.no_grad():
        (features,) = theirs(images)
    assert np.array_equal(our_features["dinov2-vit-s-14"], features.numpy())


def test_dinov2_giant_swiglu_blocks_equal_timm(images: torch.Tensor) -> None:
    # ViT-g/14 in full is 1.1B parameters; two of its blocks test its SwiGLU FFN and 24-head attention.
    state = make_dinov2_state("dinov2-vit-g-14", seed=5, depth=2)
    reference = timm_dinov2(state, "vit_giant_patch14_dinov2", depth=2)
    with torch.device("meta"):
        net = dinov2.DinoVisionTransformer(dataclasses.replace(dinov2.ARCHS["vitg14"], depth=2))
    net.load_state_dict(state, strict=True, assign=True)
    x = preprocess(images[:1], get_spec("dinov2-vit-g-14"))
    with torch.no_grad():
        assert max_diffs(net.eval()(x).numpy(), reference(x).numpy())[1] <= 1e-5


def test_clip_large_shaped_tower_equals_torch_fidelity_build_model(images: torch.Tensor) -> None:
    # CLIP ViT-L/14 (patch 14, width 1024, 16 heads) on two of its 24 layers, through torch-fidelity's loader.
    # The weights are fp32 and not fp16-representable: torch-fidelity rounds conv, linear and attention weights
    # through fp16 before loading whatever the file holds, and keeps `proj` and the embeddings in fp32.
    state = make_clip_state("clip-vit-l-14", seed=6, text_tower=False, layers=2)
    g = torch.Generator().manual_seed(7)
    state = {k: v.float() + 1e-4 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}  # fmt: skip
    theirs = feature_extractor_clip.build_model(dict(state), torch.float32)
    arch = clip.arch_from_state_dict(state)
    assert arch == dataclasses.replace(clip.ARCHS["ViT-L-14"], layers=2)
    net = clip.CLIPVisual(arch)
    net.load_state_dict(clip.visual_state(state), strict=True)
    x = preprocess(images[:1], get_spec("clip-vit-l-14"))
    with torch.no_grad():
        assert max_diffs(net.eval()(x).numpy(), theirs.visual(x).numpy())[1] <= 1e-6
    unrounded = clip.CLIPVisual(arch)
    unrounded.load_state_dict({k: v for k, v in state.items() if k.startswith("visual.")}, strict=True)
    with torch.no_grad():
        assert max_diffs(unrounded.eval()(x).numpy(), theirs.visual(x).numpy())[1] > 1e-5  # the rounding matters


# --------------------------------------------------------------------------------------------------------------
# Layouts: every DINOv2 size is the hub checkpoint's; CLIP files read without running their code
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "timm_model", "params"),
    [
        ("dinov2-vit-s-14", "vit_small_patch14_dinov2", 22_056_576),
        ("dinov2-vit-b-14", "vit_base_patch14_dinov2", 86_580_480),
        ("dinov2-vit-l-14", "vit_large_patch14_dinov2", 304_368_640),
        ("dinov2-vit-g-14", "vit_giant_patch14_dinov2", 1_136_480_768),
    ],
)
def test_dinov2_layout_is_the_hub_checkpoint_s(name: str, timm_model: str, params: int) -> None:
    with torch.device("meta"):
        ours = dinov2.DinoVisionTransformer(dinov2.ARCHS[get_spec(name).arch]).state_dict()
    assert sum(t.numel() for t in ours.values()) == params  # torch.hub's dinov2 model, parameters counted
    dim = get_spec(name).dim
    assert ours["pos_embed"].shape == (1, 1370, dim) and ours["mask_token"].shape == (1, dim)
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model(timm_model, pretrained=False, num_classes=0).state_dict()  # 518 px, like the hub
    renamed = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v.shape for k, v in ours.items()}
    del renamed["mask_token"]  # dropped by timm's DINOv2 checkpoint conversion
    assert renamed == {k: v.shape for k, v in reference.items()}


def test_clip_reader_returns_torchscript_state_dict_without_loading_the_program(clip_path: Path) -> None:
    ours = clip.read_torchscript_tensors(clip_path)
    theirs = torch.jit.load(str(clip_path), map_location="cpu").state_dict()
    assert set(theirs) <= set(ours)
    assert all(torch.equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in theirs.items())
    text_side = {"input_resolution", "context_length", "vocab_size", "token_embedding.weight", "ln_final.weight"}
    assert text_side <= set(ours)
    assert ours["visual.conv1.weight"].dtype == torch.float16 and ours["visual.ln_pre.weight"].dtype == torch.float32


def test_clip_plain_state_dict_file_gives_the_same_features(
    clip_path: Path, tmp_path: Path, images: torch.Tensor, our_features: dict
) -> None:
    path = tmp_path / "clip-state-dict.pth"
    visual = {k: v for k, v in clip.read_torchscript_tensors(clip_path).items() if k.startswith("visual.")}
    torch.save(visual, path)  # the visual tower's keys are all that a plain file needs
    assert np.array_equal(build("clip-vit-b-32", path, "cpu")(images), our_features["clip-vit-b-32"])


def test_clip_reader_refuses_pickled_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Exploit(), protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        build("clip-vit-b-32", path, "cpu")
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------------------------
# Batch-size independence
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov2-vit-s-14", "clip-vit-b-32", "vgg16"])
def test_features_do_not_depend_on_how_a_batch_is_split(
    name: str, ours: dict, images: torch.Tensor, our_features: dict
) -> None:
    split = np.concatenate([ours[name](images[:1]), ours[name](images[1:3]), ours[name](images[3:])])
    assert max_diffs(split, our_features[name])[1] <= 1e-5  # fp32 rounding of differently shaped GEMMs


# --------------------------------------------------------------------------------------------------------------
# Wrong, missing and cached weight files
# --------------------------------------------------------------------------------------------------------------


def test_weights_of_another_size_are_a_clear_error(dinov2_path: Path) -> None:
    with pytest.raises(
        WeightsError, match=r"not a dinov2-vit-b-14 .*wrong shapes: \[.cls_token \(1, 1, 384\)≠\(1, 1, 768\)"
    ):
        build("dinov2-vit-b-14", dinov2_path, "cpu")


def test_weights_of_another_family_are_a_clear_error(dinov2_path: Path, clip_path: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a torchvision vgg16 state dict"):
        build("vgg16", dinov2_path, "cpu")
    with pytest.raises(WeightsError, match="not a CLIP ViT checkpoint"):
        build("clip-vit-b-32", dinov2_path, "cpu")
    with pytest.raises(WeightsError, match=r"holds a CLIP .*clip-vit-b-16 is"):
        build("clip-vit-b-16", clip_path, "cpu")  # same resolution and width, other patch size
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for name in ("dinov2-vit-s-14", "clip-vit-b-32"):
        with pytest.raises(WeightsError, match="not a readable"):
            build(name, garbage, "cpu")


def test_missing_weights_say_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"dinov2_vitl14_pretrain\.pth from https://dl\.fbaipublicfiles\.com/.*EVALFARM_WEIGHTS_DINOV2_VIT_L_14"):  # fmt: skip
        build("dinov2-vit-l-14", tmp_path / "absent.pth", "cpu")
    with pytest.raises(WeightsError, match="downloading is disabled"):
        resolve_extractor_weights("clip-vit-l-14", None, tmp_path, allow_download=False)


def test_the_extractor_s_environment_variable_names_its_file(vgg16_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVALFARM_WEIGHTS_VGG16", str(vgg16_path))
    monkeypatch.setenv("EVALFARM_ALLOW_DOWNLOAD", "0")
    assert load_extractor_weights(Settings(), "vgg16").path == vgg16_path
    with pytest.raises(WeightsError, match="EVALFARM_WEIGHTS_CLIP_VIT_B_32"):
        load_extractor_weights(Settings(), "clip-vit-b-32")


def test_a_corrupt_file_under_a_canonical_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"truncated download")
    with pytest.raises(WeightsError, match="not the published 397923af"):
        resolve_extractor_weights("vgg16", None, tmp_path, allow_download=False)


def test_the_weights_path_and_its_hash_travel_with_the_extractor(vgg16_path: Path, ours: dict) -> None:
    weights = ours["vgg16"].weights
    assert weights.path == vgg16_path and weights.sha256 == file_sha256(vgg16_path)
    assert weights.canonical is False  # seeded weights are never taken for the published file
    assert ours["dinov2-vit-s-14"].weights.canonical is None  # no published hash to compare with


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_checks_the_published_hash(tmp_path: Path, file_server: str) -> None:
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"an impostor")
    spec = dataclasses.replace(get_spec("vgg16"), urls=(f"{file_server}/vgg16-397923af.pth",))
    with pytest.raises(WeightsError, match="does not start with 397923af"):
        download_extractor_weights(spec, tmp_path / "cache" / spec.weights_file)
    assert not (tmp_path / "cache" / spec.weights_file).exists()


def test_download_without_published_hash_records_the_file_s(tmp_path: Path, file_server: str) -> None:
    (tmp_path / "served.pth").write_bytes(b"dinov2 bytes")
    spec = dataclasses.replace(get_spec("dinov2-vit-s-14"), urls=(f"{file_server}/served.pth",))
    weights = download_extractor_weights(spec, tmp_path / "cache" / spec.weights_file)
    assert weights.sha256 == file_sha256(tmp_path / "served.pth") and weights.canonical is None
