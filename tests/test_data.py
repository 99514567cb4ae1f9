"""minicycle.data: finding and loading images, transforms, the unaligned dataset, epoch plans."""

import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from minicycle.data import (
    DataError,
    UnalignedDataset,
    check_preprocess,
    epoch_plan,
    find_images,
    get_transform,
    image_to_tensor,
    input_paths,
    load_image,
    tensor_to_image,
)


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def solid(path, value: int, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


# ---- find_images ----


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.Png", "sub/deeper/d.jpeg", "e.tiff", "f.bmp"]:
        solid(tmp_path / name, 0)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"junk")  # e.g. macOS ._ files
    got = find_images(tmp_path)
    assert got == sorted(got)
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "a.JPG", "b.png", "e.tiff", "f.bmp", "sub/c.Png", "sub/deeper/d.jpeg",
    ]  # fmt: skip
    assert find_images(tmp_path, max_dataset_size=2) == got[:2]
    assert find_images(tmp_path, max_dataset_size=float("inf")) == got


def test_find_images_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="nope.*does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*is empty"):
        find_images(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text("x")
    with pytest.raises(DataError, match=r"docs holds 3 files, none an image \(looked for .jpg"):
        find_images(tmp_path / "docs")
    solid(tmp_path / "file.png", 0)
    with pytest.raises(DataError, match="file.png is not a folder"):
        find_images(tmp_path / "file.png")


# ---- load_image ----


def test_load_grayscale_and_channels(tmp_path):
    gray = noise_image(8, 6, mode="L")
    gray.save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png", 3)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    a = np.asarray(rgb)
    assert (a[..., 0] == np.asarray(gray)).all() and (a[..., 0] == a[..., 2]).all()
    noise_image(8, 6).save(tmp_path / "c.png")
    assert load_image(tmp_path / "c.png", 1).mode == "L"
    Image.new("1", (4, 4), 1).save(tmp_path / "bw.png")
    assert np.asarray(load_image(tmp_path / "bw.png", 1)).min() == 255
    with pytest.raises(DataError, match="channels"):
        load_image(tmp_path / "c.png", 4)


def test_load_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    img.putdata([0, 1, 2, 0])
    img.save(tmp_path / "p.png", transparency=0)
    a = np.asarray(load_image(tmp_path / "p.png", 3))
    assert a.tolist() == [[[255, 255, 255], [255, 0, 0], [0, 0, 255], [255, 255, 255]]]


def test_load_rgba_and_la_composite_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img.save(tmp_path / "a.png")
    a = np.asarray(load_image(tmp_path / "a.png", 3)).astype(int)
    assert a[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not the hidden red
    assert a[0, 1].tolist() == [0, 0, 255]
    assert (abs(a[0, 2] - 127) <= 1).all()  # half-transparent black over white
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png", 1)).min() == 255


def test_load_cmyk(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert np.asarray(load_image(tmp_path / "cmyk.tif", 3))[0, 0].tolist() == [255, 0, 0]


def test_load_applies_exif_orientation(tmp_path):
    img = noise_image(8, 4)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg", 3).size == (4, 8)


def test_load_16bit_gray_scales_instead_of_clipping(tmp_path):
    v = np.arange(256)
    Image.fromarray((v * 257).astype(np.uint16)[None].repeat(2, 0)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    a = np.asarray(load_image(tmp_path / "g16.png", 1))
    assert a[0].tolist() == v.tolist()  # Pillow's own convert would give 0,255,255,...
    assert np.asarray(load_image(tmp_path / "g16.png", 3))[1, :, 1].tolist() == v.tolist()
    Image.fromarray((v / 255).astype(np.float32)[None]).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif", 1))[0].tolist() == v.tolist()


def _png_rgb16(path, rgb16: np.ndarray) -> None:
    # Pillow cannot write 16-bit RGB PNGs, so write one by hand.
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_load_16bit_rgb_png(tmp_path):
    v = np.arange(256) * 257
    _png_rgb16(tmp_path / "c16.png", np.stack([v, v[::-1], v], -1)[None])
    a = np.asarray(load_image(tmp_path / "c16.png", 3))
    assert a[0, :, 0].tolist() == list(range(256)) and a[0, :, 1].tolist() == list(range(255, -1, -1))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_load_truncated_or_garbage_names_the_file(tmp_path, fmt):
    path = tmp_path / f"broken.{fmt}"
    noise_image(64, 64).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"cannot read image .*broken.{fmt}") as e:
        load_image(path, 3)
    assert "\n" not in str(e.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        load_image(tmp_path / "text.png", 3)


# ---- transforms ----


def test_check_preprocess_errors():
    check_preprocess("crop", 100, 256)  # crop alone may exceed load_size: small images are upscaled
    for mode in ("resize_and_crop", "scale_width_and_crop"):
        with pytest.raises(DataError, match=f"--crop_size 256 .*--load_size 128.*{mode}"):
            check_preprocess(mode, 128, 256)
    with pytest.raises(DataError, match="--preprocess 'zoom'.*resize_and_crop"):
        check_preprocess("zoom", 286, 256)
    with pytest.raises(DataError, match="at least 1"):
        check_preprocess("none", 0, 256)
    with pytest.raises(DataError):
        get_transform("resize_and_crop", 128, 256, False, 3)


@pytest.mark.parametrize(
    ("preprocess", "load", "crop", "size", "shape"),
    [
        ("resize_and_crop", 40, 32, (100, 60), (3, 32, 32)),
        ("crop", 286, 32, (100, 60), (3, 32, 32)),
        ("scale_width", 50, 20, (100, 60), (3, 30, 50)),  # width -> 50, height 60 * 50/100
        ("scale_width", 50, 32, (100, 20), (3, 32, 50)),  # height kept >= crop_size
        ("scale_width_and_crop", 50, 24, (100, 60), (3, 24, 24)),
        ("none", 286, 256, (30, 50), (3, 48, 32)),  # W 30 -> 32, H 50 -> 48 (nearest multiple of 4)
        ("none", 286, 256, (2, 1), (3, 4, 4)),
        ("crop", 286, 32, (10, 20), (3, 32, 32)),  # smaller than the crop: upscaled, no crash
        ("resize_and_crop", 40, 32, (5, 7), (3, 32, 32)),
    ],
)
def test_transform_output_shapes(preprocess, load, crop, size, shape):
    t = get_transform(preprocess, load, crop, no_flip=False, channels=3)(noise_image(*size), random.Random(0))
    assert t.shape == shape and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1


def test_transform_crop_is_a_window_of_the_image():
    img = noise_image(40, 36)
    out = get_transform("crop", 286, 16, no_flip=True, channels=3)(img, random.Random(3))
    full = image_to_tensor(img)
    hits = [(y, x) for y in range(21) for x in range(25) if torch.equal(full[:, y : y + 16, x : x + 16], out)]
    assert len(hits) == 1


def test_transform_none_keeps_multiple_of_4_exactly():
    img = noise_image(32, 48)
    assert torch.equal(get_transform("none", 1, 1, True, 3)(img, random.Random(0)), image_to_tensor(img))


def test_transform_channels_1():
    t = get_transform("resize_and_crop", 40, 32, False, channels=1)(noise_image(50, 50), random.Random(0))
    assert t.shape == (1, 32, 32)


def test_flip_probability_and_no_flip():
    img = noise_image(16, 16)
    plain, flipped = image_to_tensor(img), image_to_tensor(img.transpose(Image.FLIP_LEFT_RIGHT))
    flip = get_transform("none", 16, 16, no_flip=False, channels=3)
    outs = [flip(img, random.Random(s)) for s in range(200)]
    n_flipped = sum(torch.equal(o, flipped) for o in outs)
    assert n_flipped + sum(torch.equal(o, plain) for o in outs) == 200
    assert 60 < n_flipped < 140
    keep = get_transform("none", 16, 16, no_flip=True, channels=3)
    assert all(torch.equal(keep(img, random.Random(s)), plain) for s in range(50))


def test_transform_deterministic_given_rng():
    img = noise_image(80, 70)
    t = get_transform("resize_and_crop", 64, 32, False, 3)
    assert torch.equal(t(img, random.Random(7)), t(img, random.Random(7)))
    assert len({t(img, random.Random(s)).sum().item() for s in range(10)}) > 1
    state = random.getstate()
    t(img, random.Random(1))
    assert random.getstate() == state  # the global RNG is never used


# ---- pixel convention ----


def test_pixel_round_trip_exact():
    v = np.arange(256, dtype=np.uint8)
    rgb = Image.fromarray(np.stack([v, v[::-1], np.roll(v, 7)], -1).reshape(16, 16, 3), "RGB")
    t = image_to_tensor(rgb)
    assert t.shape == (3, 16, 16) and t.min() == -1 and t.max() == 1
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(rgb))
    gray = Image.fromarray(v.reshape(16, 16), "L")
    out = tensor_to_image(image_to_tensor(gray))
    assert out.mode == "L" and np.array_equal(np.asarray(out), np.asarray(gray))


def test_tensor_to_image_rounds_and_clamps():
    t = torch.tensor([127.6 / 255 * 2 - 1, 5.0, -3.0]).reshape(1, 1, 3)
    assert np.asarray(tensor_to_image(t)).tolist() == [[128, 255, 0]]
    with pytest.raises(ValueError, match="shape"):
        tensor_to_image(torch.zeros(1, 3, 4, 4))


# ---- UnalignedDataset ----


@pytest.fixture
def dataroot(tmp_path):
    for i in range(3):
        solid(tmp_path / "trainA" / f"{i}.png", 10 * i)
    for i in range(5):
        solid(tmp_path / "trainB" / f"{i}.png", 100 + 10 * i)
    return tmp_path


def pixel(t: torch.Tensor) -> int:
    return round((t[0, 0, 0].item() + 1) / 2 * 255)


def make(root, **kw):
    return UnalignedDataset(root, preprocess="none", no_flip=True, **kw)


def test_unaligned_pairs_keys(dataroot):
    ds = make(dataroot)
    assert len(ds) == 5 and len(ds.A_paths) == 3 and ds.B_paths == sorted(ds.B_paths)
    item = ds[(2, 4, 123)]
    assert pixel(item["A"]) == 20 and pixel(item["B"]) == 140
    assert item["A_paths"].endswith("2.png") and item["B_paths"].endswith("4.png")
    assert item["A"].shape == (3, 32, 32)
    for a, b, s in epoch_plan(3, 5, epoch=1, seed=0, serial_batches=True):
        item = ds[(a, b, s)]
        assert (pixel(item["A"]), pixel(item["B"])) == (10 * a, 100 + 10 * b)
    assert make(dataroot, input_nc=1)[(0, 0, 0)]["A"].shape == (1, 32, 32)


def test_unaligned_seed_fixes_augmentation(dataroot):
    noise_image(40, 40, seed=1).save(dataroot / "trainA" / "0.png")
    ds = UnalignedDataset(dataroot, load_size=36, crop_size=32)
    assert torch.equal(ds[(0, 0, 5)]["A"], ds[(0, 0, 5)]["A"])
    assert len({ds[(0, 0, s)]["A"].sum().item() for s in range(8)}) > 1


def test_unaligned_with_dataloader(dataroot):
    ds = make(dataroot)
    plan = epoch_plan(len(ds.A_paths), len(ds.B_paths), epoch=1, seed=0, serial_batches=False)
    batches = list(torch.utils.data.DataLoader(ds, sampler=plan, batch_size=2))
    assert [b["A"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["A"].shape == (2, 3, 32, 32) and len(batches[0]["A_paths"]) == 2


def test_unaligned_missing_domain(dataroot):
    for p in (dataroot / "trainB").iterdir():
        p.unlink()
    (dataroot / "trainB").rmdir()
    with pytest.raises(DataError, match="trainB does not exist"):
        make(dataroot)
    with pytest.raises(DataError, match="testA does not exist"):
        make(dataroot, phase="test")


def test_unaligned_skips_corrupt_image_once(dataroot):
    (dataroot / "trainA" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    ds = make(dataroot)
    with pytest.warns(UserWarning, match=r"1\.png.*skipping"):
        item = ds[(1, 0, 0)]
    assert pixel(item["A"]) == 20 and item["A_paths"].endswith("2.png")  # the next good image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the file is already known bad
        assert ds[(1, 0, 1)]["A_paths"].endswith("2.png")
        assert ds[(2, 3, 0)]["A_paths"].endswith("2.png")


def test_unaligned_corrupt_last_wraps_and_works_in_workers(dataroot):
    (dataroot / "trainA" / "2.png").write_bytes(b"junk")
    ds = make(dataroot)
    keys = [(2, 0, 0), (0, 0, 0), (2, 1, 0), (1, 1, 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(ds, sampler=keys, batch_size=1, num_workers=2)
        got = [pixel(b["A"][0]) for b in loader]
    assert got == [0, 0, 0, 10]


def test_unaligned_all_corrupt(dataroot):
    for p in (dataroot / "trainB").iterdir():
        p.write_bytes(b"junk")
    ds = make(dataroot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="none of the 5 images in .*trainB can be read"):
            ds[(0, 3, 0)]


# ---- epoch_plan ----


def test_epoch_plan_deterministic_and_covers_A():
    plan = epoch_plan(7, 3, epoch=2, seed=42, serial_batches=False)
    assert plan == epoch_plan(7, 3, epoch=2, seed=42, serial_batches=False)
    assert len(plan) == 7 and sorted(a for a, _, _ in plan) == list(range(7))
    assert all(0 <= b < 3 for _, b, _ in plan)
    assert len({s for _, _, s in plan}) == 7
    assert plan != epoch_plan(7, 3, epoch=3, seed=42, serial_batches=False)
    assert plan != epoch_plan(7, 3, epoch=2, seed=43, serial_batches=False)
    resumed = epoch_plan(7, 3, epoch=2, seed=42, serial_batches=False)[4:]
    assert resumed == plan[4:]


def test_epoch_plan_smaller_A_and_random_B():
    plan = epoch_plan(3, 7, epoch=1, seed=0, serial_batches=False)
    assert len(plan) == 7
    assert sorted(a for a, _, _ in plan) == [0, 0, 0, 1, 1, 2, 2]
    bs = [b for a, b, s in epoch_plan(10, 10, epoch=1, seed=0, serial_batches=False)]
    assert bs != list(range(10))


def test_epoch_plan_serial_and_global_rng_untouched():
    state, tstate = random.getstate(), torch.random.get_rng_state()
    plan = epoch_plan(3, 5, epoch=1, seed=0, serial_batches=True)
    assert [(a, b) for a, b, _ in plan] == [(i % 3, i % 5) for i in range(5)]
    assert random.getstate() == state and torch.equal(torch.random.get_rng_state(), tstate)
    with pytest.raises(ValueError):
        epoch_plan(0, 5, 1, 0, False)


# ---- input_paths ----


def test_input_paths(tmp_path):
    solid(tmp_path / "in" / "b.png", 0)
    solid(tmp_path / "in" / "a" / "x.jpg", 0)
    paths = input_paths(tmp_path / "in")
    assert len(paths) == 2 and paths == sorted(paths) and paths[1].name == "b.png"
    assert input_paths(tmp_path / "in" / "b.png") == [tmp_path / "in" / "b.png"]
    with pytest.raises(DataError, match="missing.png does not exist"):
        input_paths(tmp_path / "missing.png")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="none is empty"):
        input_paths(tmp_path / "none")
