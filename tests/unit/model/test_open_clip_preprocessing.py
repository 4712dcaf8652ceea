"""Every way pixels enter the tower feeds it what open_clip's own transform of that model gives.

Three open_clip models whose preprocessing differs (ViT-B-32: shorter side and centre crop, 224 px;
ViT-B-16-SigLIP with its webli tag's settings: squashed, mean and std 0.5; the shipped base: 64 px),
randomly initialised or shipped, no weights downloaded. For each, a few images of other sizes and
aspect ratios (one a JPEG turned by EXIF, one with alpha, one paletted) go through the training path
(the typographic builder's stored images, read back as training reads them), the serving engine
(the endpoint's decoding, then ReleaseModel) and the embed job (its decode task, then the actor's
ReleaseModel call), and the tensor each hands the image tower is compared with open_clip's transform
of the same upright RGB image.
"""
from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image, ImageOps

from po_cluster.config import ModelConfig, PreprocessConfig
from po_cluster.data.images import Geometry, ImageLimitsConfig
from po_cluster.data.pairs import DataError, load_preference_data
from po_cluster.data.typographic import TypographicConfig, build_typographic
from po_cluster.embed.decode import decode_batch
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import load_checkpoint, model_description, save_checkpoint
from po_cluster.model.loading import SHIPPED_BASE_DIR, WEIGHTS_FILE, load_clip, resolve_preprocess
from po_cluster.model.release import ReleaseModel
from po_cluster.serving.limits import LimitsConfig, decode_image_bytes
from po_cluster.store.location import StoreConfig

TOLERANCE = 1e-6  # the bound; the conversions are the same operations, so the difference is 0
EXIF_ORIENTATION = 0x0112


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([y * 250 // height, x * 250 // width, (3 * x + y) % 251], axis=-1)
    image = image + np.random.default_rng(seed).integers(0, 30, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _files() -> dict[str, bytes]:
    """Encoded images of several sizes and modes, each under its class folder's name."""
    out = {}
    for name, (height, width, fmt) in {"tall": (300, 170, "PNG"), "wide": (131, 397, "PNG"),
                                       "tiny": (40, 57, "PNG"), "exact": (224, 224, "PNG")}.items():
        buffer = io.BytesIO()
        Image.fromarray(_photo(height, width, len(out))).save(buffer, format=fmt)
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()  # stored turned, with EXIF orientation 6: upright it is 250 × 160
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(_photo(250, 160, 9), 1))).save(
        buffer, format="JPEG", quality=92, exif=exif.tobytes())
    out["turned"] = buffer.getvalue()
    buffer = io.BytesIO()  # RGBA: the alpha is dropped
    Image.fromarray(np.dstack([_photo(90, 200, 5), np.full((90, 200), 128, np.uint8)]), "RGBA").save(buffer, "PNG")
    out["alpha"] = buffer.getvalue()
    buffer = io.BytesIO()  # paletted: its colours
    Image.fromarray(_photo(180, 120, 6)).quantize(64).save(buffer, "PNG")
    out["palette"] = buffer.getvalue()
    return out


FILES = _files()


def _upright(raw: bytes) -> Image.Image:
    """The image as a viewer shows it, RGB: what open_clip's transform is given."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")


def _open_clip_transform(name: str):
    """open_clip's own evaluation transform of each model, as create_model_and_transforms returns it."""
    if name == "ViT-B-32":
        return open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)[2]
    if name == "po-tiny-rn":
        return open_clip.create_model_and_transforms("po-tiny-rn", pretrained=str(SHIPPED_BASE_DIR / WEIGHTS_FILE))[2]
    # the webli tag's weights are not downloaded: its declared settings on the tower's size, as open_clip's
    # create_model merges them for that tag
    cfg = merge_preprocess_dict(PreprocessCfg(size=224), open_clip.get_pretrained_cfg(name, "webli"))
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


MODELS = {"ViT-B-32": ModelConfig(name="ViT-B-32", pretrained=None, image_tower="frozen"),
          "ViT-B-16-SigLIP": ModelConfig(name="ViT-B-16-SigLIP", pretrained=None, preprocess="webli",
                                         image_tower="frozen"),
          "po-tiny-rn": ModelConfig(image_tower="frozen")}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    torch.manual_seed(0)
    cfg = MODELS[request.param]
    model = AlignedCLIP(load_clip(cfg), "frozen")
    transform = _open_clip_transform(request.param)
    expected = {name: transform(_upright(raw)) for name, raw in FILES.items()}
    return request.param, cfg, model, expected


class TowerReached(Exception):
    """Raised by the hook once the tower has its input: the rest of its forward is not under test."""


class TowerInputs:
    """The tensor the image tower is called with, caught by a forward pre-hook on it (one call: the
    images here are fewer than a pass's max_forward)."""

    def __init__(self, model: AlignedCLIP) -> None:
        self.seen: list[torch.Tensor] = []
        self._handle = model.clip.visual.register_forward_pre_hook(self._catch)

    def _catch(self, _module, args) -> None:
        self.seen.append(args[0].detach().clone())
        raise TowerReached

    def __enter__(self) -> TowerInputs:
        return self

    def __exit__(self, kind, *_) -> bool:
        self._handle.remove()
        return kind is TowerReached

    def rows(self) -> torch.Tensor:
        assert len(self.seen) == 1, "the tower was not called, or called more than once"
        return self.seen[0]


def _max_diff(got: torch.Tensor, names: list[str], expected: dict[str, torch.Tensor]) -> float:
    want = torch.stack([expected[name] for name in names])
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = float((got - want).abs().max())
    print(f"max abs diff {diff:g} over {len(names)} images")  # the figure the issue asks for (pytest -s)
    return diff


def test_the_resolved_preprocessing_is_each_models_own(case):
    name, cfg, model, _ = case
    geometry = model.preprocess.geometry
    assert (geometry.size, geometry.resize_mode) == {"ViT-B-32": (224, "shortest"), "po-tiny-rn": (64, "shortest"),
                                                     "ViT-B-16-SigLIP": (224, "squash")}[name]
    assert model.preprocess == resolve_preprocess(cfg.name, cfg.pretrained, cfg.preprocess)


@torch.no_grad()
def test_training_path_feeds_open_clips_pixels(case, tmp_path):
    """Builder (fitted for the model) → records read as training reads them → the tower."""
    name, cfg, model, expected = case
    source = tmp_path / "src"
    for label, raw in FILES.items():
        (source / label).mkdir(parents=True)
        (source / label / "image.png").write_bytes(raw)
    build_typographic(TypographicConfig(source=str(source), out=str(tmp_path / "ds"), own_word=0.0, workers=2,
                                        model=cfg))
    _, reg = load_preference_data(str(tmp_path / "ds"), model.preprocess.geometry)  # its clean images
    names = [reg.classnames[label].removeprefix("a photo of a ").removesuffix(".") for label in reg.labels]
    with TowerInputs(model) as tower:
        model.encode_image(model.pixels(reg.images))  # what memory_batch and the stream hand the policy
    assert _max_diff(tower.rows(), names, expected) <= TOLERANCE


@torch.no_grad()
def test_serving_engine_path_feeds_open_clips_pixels(case):
    """The endpoint's decoding (limits.decode_image_bytes) → ReleaseModel.image_features → the tower."""
    _, _, model, expected = case
    names = list(FILES)
    release = ReleaseModel("r-test", model, {"prompt_template": "{}"})
    with TowerInputs(model) as tower:
        release.image_features([decode_image_bytes(FILES[n], "image", LimitsConfig()) for n in names])
    assert _max_diff(tower.rows(), names, expected) <= TOLERANCE


@torch.no_grad()
def test_embed_job_path_feeds_open_clips_pixels(case, tmp_path):
    """The embed job's decode task → the model actor's ReleaseModel.pixel_features → the tower."""
    _, _, model, expected = case
    names = list(FILES)
    for n in names:
        (tmp_path / f"{n}.img").write_bytes(FILES[n])
    batch = {"id": np.array(names, dtype=object), "shard": np.zeros(len(names), dtype=np.int32),
             "source_uri": np.array([str(tmp_path / f"{n}.img") for n in names], dtype=object)}
    decoded = decode_batch(batch, model.preprocess, ImageLimitsConfig(), StoreConfig())
    assert decoded["code"].tolist() == [""] * len(names)
    release = ReleaseModel("r-test", model, {"prompt_template": "{}"})
    with TowerInputs(model) as tower:
        release.pixel_features(torch.from_numpy(decoded["pixels"]))
    assert _max_diff(tower.rows(), names, expected) <= TOLERANCE


def test_the_checks_can_fail():
    """The models' geometries do tell these images apart: squashing and cropping give other pixels."""
    image = _upright(FILES["wide"])
    crop = _open_clip_transform("ViT-B-32")(image)
    squash = _open_clip_transform("ViT-B-16-SigLIP")(image)
    assert float((crop * 0.26862954 + 0.48145466 - (squash * 0.5 + 0.5)).abs().max()) > 0.1


def test_a_dataset_fitted_for_another_model_is_refused(tmp_path):
    source = tmp_path / "src"
    for label in ("tall", "wide", "tiny"):
        (source / label).mkdir(parents=True)
        (source / label / "image.png").write_bytes(FILES[label])
    build_typographic(TypographicConfig(source=str(source), out=str(tmp_path / "ds"), workers=1,
                                        splits=(0.34, 0.33, 0.33), model=MODELS["ViT-B-32"]))
    siglip = resolve_preprocess("ViT-B-16-SigLIP", None, "webli").geometry
    with pytest.raises(DataError, match=r"fitted to 224 px \(shortest, bicubic\).*takes 224 px \(squash, bicubic\)"):
        load_preference_data(str(tmp_path / "ds"), siglip)
    assert load_preference_data(str(tmp_path / "ds"), Geometry(224))[0].images.shape[1:] == (224, 224, 3)


def test_a_checkpoint_keeps_its_preprocessing(tmp_path):
    """A release is built from bare weights: its model.json carries the start's preprocessing."""
    cfg = ModelConfig(image_tower="frozen", preprocess=PreprocessConfig(resize_mode="squash", interpolation="bilinear",
                                                                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    model = AlignedCLIP(load_clip(cfg), "frozen")
    save_checkpoint(tmp_path / "ckpt", model, model_description(model, cfg, ("a", "b"), "{}"), {}, {})
    loaded, description = load_checkpoint(tmp_path / "ckpt")
    assert loaded.preprocess == model.preprocess and description["preprocess"]["resize_mode"] == "squash"
    assert loaded.preprocess != AlignedCLIP(load_clip(ModelConfig()), "frozen").preprocess


def test_an_unknown_tag_is_refused_by_name():
    from po_cluster.model.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="preprocess 'laion': not an open_clip pretrained tag of ViT-B-16-SigLIP "
                                             r"\(its tags: webli\)"):
        resolve_preprocess("ViT-B-16-SigLIP", None, "laion")
