"""Image decoding: mode conversions and clear errors naming the file."""

import numpy as np
import pytest
from PIL import Image

from hyads.data import load_dataset, load_image, load_mask
from hyads.data.io import to_rgb_float
from hyads.errors import DatasetError, ImageError


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 0], arr / 255.0, atol=1e-6)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_rgba_is_composited_on_black(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 255
    arr[0, 0, 3] = 0  # fully transparent pixel
    arr[1, 1, 3] = 128
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    assert rgb.shape == (4, 4, 3)
    assert rgb[0, 0, 0] == 0.0
    assert rgb[2, 2, 0] == pytest.approx(200 / 255)
    assert rgb[1, 1, 0] == pytest.approx(200 / 255 * 128 / 255, abs=2 / 255)


def test_16bit_png_keeps_full_range(tmp_path):
    arr = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    rgb = load_image(tmp_path / "d.png")
    np.testing.assert_allclose(rgb[..., 1], arr / 65535.0, atol=1e-6)


def test_palette_image(tmp_path):
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.save(tmp_path / "p.png")
    rgb = load_image(tmp_path / "p.png")
    assert rgb[0, 1, 0] == 1.0 and rgb[0, 1, 1] == 0.0


def test_resize(tmp_path):
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(tmp_path / "r.jpg")
    rgb = load_image(tmp_path / "r.jpg", size=64)
    assert rgb.shape == (64, 64, 3)
    assert abs(float(rgb.mean()) - 128 / 255) < 0.01


def test_unsupported_mode_names_file():
    with pytest.raises(ImageError, match="unsupported image mode"):
        to_rgb_float(Image.new("RGBa", (2, 2)), "weird.tif")


def test_truncated_image_names_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "t.png")
    assert "t.png" in str(err.value)


@pytest.mark.parametrize("content,problem", [(b"", "not a recognised"), (b"hello, not an image", "not a recognised")])
def test_non_image_bytes(tmp_path, content, problem):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ImageError, match=problem) as err:
        load_image(tmp_path / "x.png")
    assert "x.png" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_mask_size_mismatch(tmp_path):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageError, match="does not match") as err:
        load_mask(tmp_path / "m.png", expected_hw=(10, 10))
    assert "m.png" in str(err.value)
    assert load_mask(tmp_path / "m.png", expected_hw=(10, 12)).shape == (10, 12)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "absent")


def test_plain_and_class_folder_layouts(tmp_path):
    for name in ("good", "scratch"):
        (tmp_path / name).mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good" / f"{i}.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "scratch" / "s.jpg")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "scratch" / "s.png")  # its mask
    ds = load_dataset(tmp_path, test_fraction=0.4, seed=1)
    assert ds.layout == "folders"
    assert len(ds.train) == 3 and len(ds.test) == 3
    defect = [s for s in ds.test if s.label == 1]
    assert len(defect) == 1 and defect[0].mask_path.name == "s.png"
    plain = load_dataset(tmp_path / "good")
    assert plain.layout == "plain" and len(plain.train) == 5 and plain.test == []


def test_magnetic_tile_layout(magnetic):
    ds = load_dataset(magnetic, test_fraction=0.2, seed=0)
    assert len(ds.train) + sum(1 for s in ds.test if s.label == 0) == 952
    assert sum(s.label for s in ds.test) == 392
    assert all(s.mask_path is not None and s.mask_path.suffix == ".png" for s in ds.test if s.label)


def test_bottle_layout(bottle):
    ds = load_dataset(bottle)
    assert ds.layout == "mvtec" and len(ds.train) == 209 and len(ds.test) == 83
    assert sum(s.label for s in ds.test) == 63 and ds.has_masks


def test_rgb_batch_decodes_in_parallel_exactly_and_names_a_bad_file(tmp_path):
    from hyads.pipeline import rgb_batch

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        arr = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    batch = rgb_batch(paths, 32)
    assert batch.shape == (5, 32, 32, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, np.stack([load_image(p, 32) for p in paths]))
    # Unresized pixels are exactly the 8-bit levels / 255 (rounded once, from float64).
    np.testing.assert_array_equal(load_image(paths[0]), (np.asarray(Image.open(paths[0])) / 255.0).astype(np.float32))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png"):
        rgb_batch(paths[:3] + [tmp_path / "bad.png"], 32)
