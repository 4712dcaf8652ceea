"""The one image path (po_cluster.data.images): EXIF orientation, RGB conversion, refusals, the model's resize and crop,
and the same pixels and embedding whether a file is read as training data or decoded by the endpoint.
(Through the served app and the embed job too: tests/integration/data/test_image_path.py.)"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from po_cluster.data import images
from po_cluster.data.images import Geometry, ImageRefused, Preprocess, decode, decode_fit, is_image_name
from po_cluster.data.pairs import DataError, decode_image, load_image, load_images
from po_cluster.model.loading import to_model_input
from po_cluster.serving.limits import ApiError, LimitsConfig, decode_image_bytes

ORIENTATION = 0x0112  # the EXIF tag
SERVED_LIMITS = LimitsConfig()  # the endpoint's defaults


def photo(height: int = 48, width: int = 32, seed: int = 0) -> np.ndarray:
    """A non-square image that no flip or rotation maps onto itself: gradients, a corner block, noise."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([y * 200 // height, x * 200 // width, (x + 2 * y) % 97], axis=-1).astype(np.int64)
    image[: height // 4, : width // 3] = (250, 30, 30)  # top left
    image += np.random.default_rng(seed).integers(0, 40, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def stored_as(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for an upright picture when it writes EXIF `orientation` (the tag
    says what a viewer must do to show the stored pixels upright), from the EXIF definition, in NumPy."""
    return {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2),  # mirrored about the main diagonal
            6: lambda a: np.rot90(a, 1),  # shown after a quarter turn clockwise: stored a quarter turn anticlockwise
            7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored about the other diagonal
            8: lambda a: np.rot90(a, -1)}[orientation](upright)


def encode(pixels: np.ndarray, fmt: str, orientation: int | None = None, **options) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def served(raw: bytes, limits: LimitsConfig = SERVED_LIMITS) -> np.ndarray:
    return decode_image_bytes(raw, "image", limits)


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(tmp_path, fmt, orientation):
    upright = photo()
    stored = stored_as(upright, orientation)
    assert orientation == 1 or not np.array_equal(stored, upright)  # the test image shows every turn and flip
    raw = encode(stored, fmt, orientation, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(raw)).getexif()[ORIENTATION] == orientation  # the file really carries it
    np.testing.assert_array_equal(images.to_pixels(decode(raw)), upright)
    np.testing.assert_array_equal(served(raw), upright)  # the endpoint (and the embed job) too
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    path.write_bytes(raw)
    np.testing.assert_array_equal(load_image(str(path), Geometry(24)), Geometry(24).fit(Image.fromarray(upright)))


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_rotated_jpeg_is_decoded_upright(orientation):
    upright = photo(60, 40)
    raw = encode(stored_as(upright, orientation), "JPEG", orientation, quality=95)
    as_stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))  # what a reader ignoring EXIF gets
    assert as_stored.shape == (40, 60, 3)
    want = stored_as(as_stored, {6: 8, 8: 6}[orientation])  # undo the quarter turn on the decoded pixels
    np.testing.assert_array_equal(served(raw), want)
    np.testing.assert_array_equal(images.to_pixels(decode(raw)), want)
    error = {name: np.abs(want.astype(int) - candidate).mean()
             for name, candidate in (("upright", upright), ("upside down", upright[::-1, ::-1]))}
    assert error["upright"] < error["upside down"] / 3, error  # that is the picture upright (JPEG-close)


def test_unknown_or_broken_orientation_leaves_the_image_as_stored():
    stored = photo()
    np.testing.assert_array_equal(served(encode(stored, "PNG", 9)), stored)
    broken = encode(stored, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        assert served(broken).shape == stored.shape


# ---------------------------------------------------------------- RGB conversion


def _converted_as_before(raw: bytes) -> np.ndarray:
    """What both readers did before they shared a path: Pillow's own conversion to RGB."""
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_modes_convert_to_rgb_as_before(tmp_path):
    rgb = photo()
    grey = rgb[..., 0]
    rgba = np.dstack([rgb, np.arange(rgb[..., 0].size, dtype=np.uint8).reshape(grey.shape)])
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    files = {
        "rgba": encode(rgba, "PNG"), "la": encode(np.dstack([grey, grey // 2]), "PNG"), "grey": encode(grey, "PNG"),
        "palette": _save(palette, "PNG"), "16-bit": encode(grey.astype(np.uint16) * 3, "PNG"),
        "cmyk": _save(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "bilevel": _save(Image.fromarray(grey > 99), "PNG"),
    }
    for name, raw in files.items():
        want = _converted_as_before(raw)
        assert want.shape == (48, 32, 3), name
        np.testing.assert_array_equal(images.to_pixels(decode(raw)), want, err_msg=name)
        np.testing.assert_array_equal(served(raw, LimitsConfig(image_formats=("PNG", "JPEG"))), want, err_msg=name)
        (tmp_path / f"{name}.img").write_bytes(raw)
        np.testing.assert_array_equal(load_image(str(tmp_path / f"{name}.img"), Geometry(32)),
                                      Geometry(32).fit_pixels(want))
    np.testing.assert_array_equal(decode(files["rgba"]), rgb)  # alpha dropped, colours kept
    assert (images.to_pixels(decode(files["grey"])) == grey[..., None]).all()  # three equal channels
    colours = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(decode(files["palette"]), colours)  # the palette's colours


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- refusals


def _refused(raw: bytes, **rules) -> ImageRefused:
    with pytest.raises(ImageRefused) as caught:
        decode(raw, **rules)
    return caught.value


def test_refusals_carry_a_code_and_name_the_problem():
    png = encode(photo(), "PNG")
    assert (_refused(b"").code, _refused(b"").message) == ("empty_image", "the image is empty")
    text = _refused(b"hello")
    assert text.code == "not_an_image" and "unknown format" in text.message
    assert "allowed formats: PNG, JPEG" in _refused(b"hello", formats=("PNG", "JPEG")).message
    for fmt in ("GIF", "TIFF", "BMP"):
        refused = _refused(encode(photo(), fmt), formats=("PNG", "JPEG", "WEBP"))
        assert refused.code == "unsupported_image_format" and f"image format {fmt} is not allowed" in refused.message
        assert decode(encode(photo(), fmt)).size == (32, 48)  # the data path reads them
    too_many = _refused(png, max_pixels=1000)
    assert (too_many.code, too_many.message) == ("image_too_many_pixels",
                                                 "the image is 32×48 = 1536 pixels, over the limit of 1000")
    truncated = _refused(png[: len(png) // 2])
    assert (truncated.code, truncated.message) == ("corrupt_image", "the PNG image is truncated or corrupt")
    jpeg = encode(photo(200, 150), "JPEG")  # cut in its pixels, not in its header
    assert _refused(jpeg[: len(jpeg) // 2]).message == "the JPEG image is truncated or corrupt"


def test_pillows_bomb_guard_is_a_refusal_too(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises above twice this
    refused = _refused(encode(photo(), "PNG"))
    assert (refused.code, refused.message) == ("image_too_many_pixels", "the image has more than 100 pixels")


def test_the_data_path_names_the_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.png").write_bytes(encode(photo(), "PNG")[:100])
    with pytest.raises(DataError, match=r"a.png: not a readable image \(unknown format or not an image\)"):
        load_images([str(tmp_path / "a.png")], Geometry(16))
    with pytest.raises(DataError, match=r"b.png: the PNG image is truncated or corrupt"):
        load_image(str(tmp_path / "b.png"), Geometry(16))
    with pytest.raises(DataError, match="x.jpg: the image is empty"):
        decode_image(b"", "x.jpg")


def test_the_endpoint_maps_codes_to_statuses():
    limits = LimitsConfig(max_image_pixels=1000)
    for raw, status, code in ((encode(photo(), "GIF"), 415, "unsupported_image_format"),
                              (encode(photo(), "PNG"), 413, "image_too_many_pixels"),
                              (b"", 422, "empty_image"), (b"hello", 422, "not_an_image"),
                              (b"\x89PNG" + bytes(limits.max_image_bytes), 413, "image_too_large")):
        with pytest.raises(ApiError) as caught:
            decode_image_bytes(raw, "input.3.image", limits)
        assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, "input.3.image")


# ---------------------------------------------------------------- the geometry (open_clip's resize and crop)


def test_shortest_resizes_the_shorter_side_and_crops_the_centre():
    image = Image.fromarray(photo(100, 50))
    out = Geometry(20).fit(image)
    assert out.size == (20, 20)
    want = image.resize((20, 40), Image.Resampling.BICUBIC).crop((0, 10, 20, 30))
    np.testing.assert_array_equal(out, want)
    same = Geometry(20).fit(Image.fromarray(photo(20, 20)))
    np.testing.assert_array_equal(same, photo(20, 20))  # already that size: untouched
    np.testing.assert_array_equal(Geometry(20).fit_pixels(photo(100, 50)), out)
    small = photo(16, 16)
    assert Geometry(16).fit_pixels(small) is small and Geometry(16).fit_pixels(photo(9, 30)).shape == (16, 16, 3)
    np.testing.assert_array_equal(decode_fit(encode(photo(100, 50), "PNG"), Geometry(20)), out)
    with pytest.raises(ValueError, match="positive"):
        Geometry(0)
    with pytest.raises(ValueError, match="resize_mode 'crop'"):
        Geometry(16, "crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        Geometry(16).fit_pixels(photo().astype(np.float32))


def test_longest_pads_with_the_fill_and_squash_ignores_the_aspect_ratio():
    image = Image.fromarray(photo(100, 50))
    padded = np.asarray(Geometry(20, "longest", fill_color=7).fit(image))
    # 100 × 50 → 20 × 10 (both sides over the larger ratio), centred in 20 × 20: 5 columns of fill each side
    np.testing.assert_array_equal(padded[:, 5:15], image.resize((10, 20), Image.Resampling.BICUBIC))
    assert (padded[:, :5] == 7).all() and (padded[:, 15:] == 7).all()
    squashed = Geometry(20, "squash", "bilinear").fit(image)
    np.testing.assert_array_equal(squashed, image.resize((20, 20), Image.Resampling.BILINEAR))


def test_model_input_resizes_with_the_same_geometry():
    pixels = np.stack([photo(90, 70, seed=s) for s in range(3)])
    preprocess = Preprocess(Geometry(64, "squash"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    want = to_model_input(np.stack([preprocess.geometry.fit_pixels(p) for p in pixels]), preprocess)
    torch.testing.assert_close(to_model_input(pixels, preprocess), want, rtol=0, atol=0)
    torch.testing.assert_close(to_model_input(torch.from_numpy(pixels), preprocess), want, rtol=0, atol=0)
    assert to_model_input(pixels[:0], preprocess).shape == (0, 3, 64, 64)


def test_image_names():
    assert is_image_name("a/b/IMG_1.JPG") and is_image_name("x.tiff") and is_image_name("x.webp")
    assert not is_image_name("a/.hidden.png") and not is_image_name("labels.csv") and not is_image_name("png")


# ---------------------------------------------------------------- training pixels = served pixels


@torch.no_grad()
def test_a_phone_photo_embeds_the_same_read_as_data_or_served(tmp_path, base_model):
    upright = photo(120, 80)
    raw = encode(stored_as(upright, 6), "JPEG", 6, quality=90)
    (tmp_path / "phone.jpg").write_bytes(raw)

    def embedding(pixels: np.ndarray) -> np.ndarray:
        return base_model.encode_image(base_model.pixels(pixels[None]))[0].numpy()

    # the training records' pixels
    trained = embedding(load_image(str(tmp_path / "phone.jpg"), base_model.preprocess.geometry))
    from_endpoint = embedding(decode_image_bytes(base64.b64decode(base64.b64encode(raw)), "image", LimitsConfig()))
    as_stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    reference = embedding(np.ascontiguousarray(np.rot90(as_stored, -1)))  # the decoded file, turned by hand
    np.testing.assert_allclose(trained, reference, atol=1e-5)
    np.testing.assert_allclose(from_endpoint, reference, atol=1e-5)
    assert np.abs(embedding(as_stored) - reference).max() > 1e-3  # the rotation is visible to the model
