"""Image folders (diffusion_jax.image_files) and their preparation into ArrayRecord shards
(diffusion_jax.prepare_data), on images made here with PIL."""

import io
import json
import os
import re
import tempfile
import threading
import warnings

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from diffusion_jax import image_files, prepare_data, records
from diffusion_jax.errors import DataError

CLASSES = ("apples", "bananas", "cherries")
SIZES = ((20, 30), (64, 48), (17, 17), (48, 64), (33, 21))  # (width, height)
CORRUPT = ("bananas/corrupt.png", "cherries/truncated.jpg")
FINISHED_SHARD = re.compile(r"train\.array_record-\d{5}-of-\d{5}")


def _noise(rng, width, height, channels=3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _encoded(kind: str, rng, width: int, height: int) -> bytes:
    """An image of ``kind`` (its mode and format) encoded as its format does."""
    rgb = _noise(rng, width, height)
    grey = rgb[..., 0]
    image, form = {
        "rgb_png": (Image.fromarray(rgb), "PNG"),
        "grey_png": (Image.fromarray(grey), "PNG"),
        "rgba_png": (Image.fromarray(_noise(rng, width, height, 4)), "PNG"),
        "palette_png": (Image.fromarray(rgb).quantize(16), "PNG"),
        "la_png": (Image.fromarray(_noise(rng, width, height, 2)[..., :2], "LA"), "PNG"),
        "i16_png": (Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "bits_png": (Image.fromarray(grey > 127), "PNG"),
        "rgb_jpeg": (Image.fromarray(rgb), "JPEG"),
        "grey_jpeg": (Image.fromarray(grey), "JPEG"),
        "cmyk_jpeg": (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "rgb_webp": (Image.fromarray(rgb), "WEBP"),
        "rgba_webp": (Image.fromarray(_noise(rng, width, height, 4)), "WEBP"),
    }[kind]
    buffer = io.BytesIO()
    image.save(buffer, format=form)
    return buffer.getvalue()


KINDS = ("rgb_png", "grey_png", "rgba_png", "palette_png", "la_png", "i16_png", "bits_png", "rgb_jpeg",
         "grey_jpeg", "cmyk_jpeg", "rgb_webp", "rgba_webp")
SUFFIXES = {"png": (".png", ".PNG"), "jpeg": (".jpg", ".jpeg", ".JPG"), "webp": (".webp", ".WebP")}


def _jpeg(rng, width=32, height=32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(rng, width, height)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 images of 12 kinds and 5 sizes in 3 class folders (some nested), 2 unreadable files, and files
    that are not images (a .txt, a hidden .png): (root, {relative path: label} of the 60 images)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = {}
    for i in range(60):
        kind = KINDS[i % len(KINDS)]
        suffixes = SUFFIXES[kind.rpartition("_")[2]]
        label = i % 3
        nested = "nested/deeper/" if i % 7 == 0 else ""
        relative = f"{CLASSES[label]}/{nested}{i:03d}_{kind}{suffixes[i % len(suffixes)]}"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(_encoded(kind, rng, *SIZES[i % len(SIZES)]))
        images[relative] = label
    (root / CORRUPT[0]).write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    jpeg = _jpeg(rng, 64, 64)
    (root / CORRUPT[1]).write_bytes(jpeg[: len(jpeg) // 2])
    (root / "apples" / "notes.txt").write_text("not an image")
    (root / "cherries" / ".hidden.png").write_bytes(b"ignored: a hidden file")
    return root, images


def test_list_folder_classes_labels_and_order(folder):
    root, images = folder
    listed = image_files.list_folder(str(root))
    everything = {**images, CORRUPT[0]: 1, CORRUPT[1]: 2}
    expected = sorted(str(root / p) for p in everything)
    assert listed.classes == CLASSES
    assert listed.paths == tuple(expected)
    assert listed.labels.dtype == np.int32
    classes_of_paths = [os.path.relpath(p, root).split(os.sep)[0] for p in expected]
    assert listed.labels.tolist() == [CLASSES.index(c) for c in classes_of_paths]


def test_list_folder_without_classes(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("b.JPEG", "a.jpg", "c.webp"):
        (tmp_path / name).write_bytes(_jpeg(rng))
    (tmp_path / "readme.txt").write_text("not an image")
    listed = image_files.list_folder(str(tmp_path))
    assert listed.paths == tuple(str(tmp_path / n) for n in ("a.jpg", "b.JPEG", "c.webp"))
    assert listed.labels.tolist() == [-1, -1, -1]
    assert listed.classes == ()


def test_list_folder_refuses_images_next_to_classes_and_empty_classes(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "1.jpg").write_bytes(_jpeg(rng))
    (tmp_path / "stray.png").write_bytes(_jpeg(rng))
    with pytest.raises(DataError, match=r"stray\.png is an image next to the class folders"):
        image_files.list_folder(str(tmp_path))
    (tmp_path / "stray.png").unlink()
    (tmp_path / "dogs").mkdir()
    with pytest.raises(DataError, match=r"class folder .*dogs holds no images"):
        image_files.list_folder(str(tmp_path))


@pytest.mark.parametrize("channels", [1, 3])
def test_every_kind_decodes_to_a_uint8_square(folder, channels):
    root, images = folder
    for relative in images:
        image = image_files.read_image(str(root / relative), 12, channels)
        assert image.shape == (12, 12, channels) and image.dtype == np.uint8, relative
        assert image.std() > 0, relative  # noise, not a blank image


def _bands(sizes, colours, axis) -> np.ndarray:
    """Bands of ``colours`` with ``sizes`` along ``axis`` (0: rows, 1: columns) of a 10-pixel-wide image."""
    parts = [np.broadcast_to(np.array(c, np.uint8), (s, 10, 3) if axis == 0 else (10, s, 3))
             for s, c in zip(sizes, colours, strict=True)]
    return np.concatenate(parts, axis=axis)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_center_crop_keeps_the_centre_square():
    wide = _bands((10, 10, 10), (RED, GREEN, BLUE), axis=1)  # 10 x 30: margins of 10 left and right
    tall = _bands((10, 10, 11), (RED, GREEN, BLUE), axis=0)  # 31 x 10: offset (31 - 10) // 2 = 10
    for image in (wide, tall):
        for size in (10, 5, 23):
            out = image_files.center_crop_resize(image, size, 3)
            assert out.shape == (size, size, 3)
            np.testing.assert_array_equal(out, np.broadcast_to(np.array(GREEN, np.uint8), out.shape))


def test_resize_is_antialiased_and_channels_convert():
    noise = np.random.default_rng(3).choice(np.array([0, 255], np.uint8), (128, 128))
    small = image_files.center_crop_resize(noise, 8, 1).astype(np.float64)
    # an average over each output pixel's footprint (~12 x 12 effective pixels): std ~ 11; sampling a few
    # pixels (no antialiasing) would leave ~ 64
    assert small.std() < 25 and abs(small.mean() - 127.5) < 15
    red = np.broadcast_to(np.array(RED, np.uint8), (6, 6, 3))
    assert image_files.center_crop_resize(red, 4, 1).ravel().tolist() == [76] * 16  # ITU-R 601: 0.299 * 255
    grey = np.full((6, 9), 77, np.uint8)
    assert image_files.center_crop_resize(grey, 4, 3).ravel().tolist() == [77] * 48


def _png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_decode_modes_alpha_palette_16_bit_and_orientation():
    under = np.zeros((8, 8, 4), np.uint8)
    under[...] = (10, 20, 30, 0)  # fully transparent: the colour under the alpha is kept
    decoded = image_files.decode(_png(Image.fromarray(under)), 4, 3)
    assert decoded.reshape(-1, 3).tolist() == [[10, 20, 30]] * 16
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette with transparency goes straight to RGB
        decoded = image_files.decode(_png(palette, transparency=bytes([255, 128])), 4, 3)
    assert decoded.reshape(-1, 3).tolist() == [[200, 100, 50]] * 16
    wide = np.array([[0, 257 * 100, 65535, 65535]] * 4, np.uint16)  # 16-bit grey: scaled, not clipped
    assert image_files.decode(_png(Image.fromarray(wide)), 4, 1)[0, :, 0].tolist() == [0, 100, 255, 255]
    halves = np.concatenate([np.full((10, 10, 3), RED, np.uint8), np.full((10, 10, 3), BLUE, np.uint8)], 1)
    plain = image_files.decode(_png(Image.fromarray(halves)), 10, 3)
    assert plain[0, 0].tolist() == list(RED) and plain[0, 9].tolist() == list(BLUE)  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: viewers rotate it 90 degrees clockwise
    turned = image_files.decode(_png(Image.fromarray(halves), exif=exif), 10, 3)
    assert turned[0, 0].tolist() == list(RED) and turned[9, 0].tolist() == list(BLUE)  # top red, bottom blue


def test_unreadable_files_are_data_errors_naming_them(folder):
    root, _ = folder
    with pytest.raises(DataError, match=r"^some/garbage\.png: not an image \(no format PIL recognizes\); "):
        image_files.decode(b"garbage, not a PNG", 8, 3, name="some/garbage.png")
    with pytest.raises(DataError, match=r"truncated\.jpg: not a readable image \(OSError: image file is "):
        image_files.read_image(str(root / CORRUPT[1]), 8, 3)
    with pytest.raises(DataError, match=r"missing\.png: cannot be read \(FileNotFoundError"):
        image_files.read_image(str(root / "missing.png"), 8, 3)


def _records(out) -> list[bytes]:
    found = []
    for path in records.shard_paths(str(out), "train"):
        reader = array_record_module.ArrayRecordReader(path)
        found += reader.read(list(range(reader.num_records())))  # by index: random access
        reader.close()
    return found


@pytest.mark.parametrize("channels, remote", [(3, False), (1, True)])
def test_prepare_writes_shards_that_read_back_as_the_images(folder, tmp_path, capsys, monkeypatch, channels,
                                                            remote):
    root, images = folder
    out, local_temporaries = tmp_path / "out", tmp_path / "local"
    local_temporaries.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_temporaries))
    if remote:  # the path for gs://: each shard written locally, then copied with epath
        monkeypatch.setattr(prepare_data, "_remote", lambda directory: True)
    status = prepare_data.main([f"--source=folder:{root}", "--image_size=12", f"--out={out}",
                                f"--channels={channels}", "--images_per_shard=16", "--threads=2"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    json_file = out / "train.json"
    assert captured.out.splitlines()[-1] == (
        f"wrote 60 images of 12x12 in 4 shards to {out}; skipped 2 unreadable files (listed in {json_file})")
    skipped_lines = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert [line.split(":")[0] for line in skipped_lines] == [f"skipped {root / p}" for p in CORRUPT]
    metadata = json.loads(json_file.read_text())
    assert metadata == records.read_metadata(str(out), "train")
    shards = [f"train.array_record-{i:05d}-of-00004" for i in range(4)]
    assert {k: metadata[k] for k in ("format", "source", "split", "image_size", "channels", "num_examples",
                                     "classes", "shards", "num_skipped")} == dict(
        format=1, source=f"folder:{root}", split="train", image_size=12, channels=channels, num_examples=60,
        classes=list(CLASSES), shards=shards, num_skipped=2)
    assert [s["path"] for s in metadata["skipped"]] == [str(root / p) for p in CORRUPT]
    assert metadata["skipped"][0]["error"] == "not an image (no format PIL recognizes)"
    assert metadata["skipped"][1]["error"].startswith("not a readable image (OSError: image file is trunc")
    assert skipped_lines == [f"skipped {s['path']}: {s['error']}" for s in metadata["skipped"]]
    assert sorted(os.listdir(out)) == sorted(shards + ["train.json"])  # no temporaries left
    assert os.listdir(local_temporaries) == []
    written = _records(out)
    expected = sorted(images)  # the readable images, in the folder's sorted order
    assert len(written) == len(expected) == 60
    for record, relative in zip(written, expected, strict=True):
        image, label = records.decode_example(record, 12, channels)
        assert label == images[relative], relative
        read = image_files.read_image(str(root / relative), 12, channels)
        assert image.tobytes() == read.tobytes(), relative


@pytest.fixture
def fresh(tmp_path):
    """An empty folder, a folder of text files, a missing path and a file, in a new directory."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    for name in ("a.txt", "b.txt", "c.md"):
        (tmp_path / "texts" / name).write_text("not an image")
    (tmp_path / "file.png").write_bytes(b"a file")
    (tmp_path / "unreadable").mkdir()
    for name in ("x.png", "y.jpg"):
        (tmp_path / "unreadable" / name).write_bytes(b"garbage")
    return tmp_path


@pytest.mark.parametrize("source, status, message", [
    ("folder:{d}/empty", 6, r"no images \(\.png, \.jpg, \.jpeg, \.webp, in any case\) in .*empty: it is "
                            "empty"),
    ("folder:{d}/texts", 6, r"no images .* in .*texts: it holds 3 other files \(e\.g\. a\.txt\)"),
    ("folder:{d}/missing", 6, r"no such directory: .*missing"),
    ("folder:{d}/file.png", 6, r".*file\.png is a file, not a directory"),
    ("folder:{d}/unreadable", 6, r"no readable images in folder:.*unreadable: all 2 files were unreadable"),
    ("nonsense:x", 2, r"--source=nonsense:x: expected KIND:VALUE with KIND one of folder:"),
    ("{d}/texts", 2, r"--source=.*texts: expected KIND:VALUE"),
])
def test_bad_sources_are_one_line_errors_with_their_status(fresh, capsys, source, status, message):
    out = fresh / "out"
    got = prepare_data.main([f"--source={source.format(d=fresh)}", "--image_size=8", f"--out={out}"])
    err = capsys.readouterr().err.splitlines()
    assert got == status
    errors = [line for line in err if not line.startswith("skipped ")]
    assert len(errors) == 1 and re.match("error: " + message, errors[0]), err
    assert not out.exists() or os.listdir(out) == []  # nothing written


def test_an_existing_split_is_not_overwritten(fresh, folder, capsys):
    out = fresh / "out"
    out.mkdir()
    (out / "train.json").write_text("{}")
    assert prepare_data.main([f"--source=folder:{folder[0]}", "--image_size=8", f"--out={out}"]) == 2
    assert re.fullmatch(r"error: .*train\.json exists: .* already holds a prepared 'train' split.*",
                        capsys.readouterr().err.strip())
    assert (out / "train.json").read_text() == "{}"


def _fail_at(monkeypatch, call: int):
    """image_files.read_image raising a bug's exception at its ``call``-th call."""
    read, calls, lock = image_files.read_image, [0], threading.Lock()

    def failing(*args, **kwargs):
        with lock:
            calls[0] += 1
            if calls[0] == call:
                raise RuntimeError("a bug in the middle of the run")
        return read(*args, **kwargs)

    monkeypatch.setattr(image_files, "read_image", failing)


def _prepare(root, out):
    return prepare_data.main([f"--source=folder:{root}", "--image_size=8", f"--out={out}",
                              "--images_per_shard=8", "--threads=2"])


def test_a_failed_run_leaves_nothing(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_at(monkeypatch, 45)  # after several shards of 8 were written
    with pytest.raises(RuntimeError, match="a bug in the middle"):  # not a project error: its traceback
        _prepare(folder[0], out)
    assert os.listdir(out) == []


def test_a_killed_run_leaves_no_finished_shard_and_the_next_run_cleans_up(folder, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "out"
    _fail_at(monkeypatch, 45)
    monkeypatch.setattr(prepare_data.ShardWriter, "abort", lambda self: None)  # killed: no clean-up runs
    with pytest.raises(RuntimeError):
        _prepare(folder[0], out)
    left = sorted(os.listdir(out))
    assert len(left) >= 3 and all(".tmp-" in name for name in left), left  # shards of 8, temporary names
    assert not any(FINISHED_SHARD.fullmatch(name) or name.endswith(".json") for name in left), left
    for name in left:  # as another process would have left them
        (out / name).rename(out / name.replace(f".tmp-{os.getpid()}", ".tmp-999999"))
    (out / "train.array_record-00000-of-00003").write_bytes(b"killed while renaming")
    monkeypatch.undo()
    capsys.readouterr()
    assert _prepare(folder[0], out) == 0
    assert f"removed {len(left) + 1} shard files of an unfinished run" in capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert names == sorted([f"train.array_record-{i:05d}-of-00008" for i in range(8)] + ["train.json"])


def test_records_and_metadata_formats(tmp_path):
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    for label in (-1, 7):
        decoded, got = records.decode_example(records.encode_example(image, label), 2, 3)
        np.testing.assert_array_equal(decoded, image)
        assert got == label
    assert records.encode_example(image, -1)[:4] == b"\xff\xff\xff\xff"
    with pytest.raises(DataError, match=r"a record of 16 bytes is not a 4x4x3 example"):
        records.decode_example(records.encode_example(image, 0), 4, 3)
    with pytest.raises(DataError, match=r"train\.json: no such file.*python -m diffusion_jax\.prepare_data"):
        records.read_metadata(str(tmp_path), "train")
    (tmp_path / "train.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(DataError, match=r"train\.json is not the metadata of a prepared dataset"):
        records.shard_paths(str(tmp_path), "train")
