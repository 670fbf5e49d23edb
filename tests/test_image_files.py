"""Local image data (`raflora.training.data.images`): folders of class subfolders and CIFAR-100's
binary version, written here from known pixels and read back; each bad input is refused in one
line naming data.name; the paper's ViT/CIFAR-100 config dry-runs on such files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raflora.training.data import load_task_data
from raflora.training.data.encode import encode_examples
from raflora.training.data.images import CIFAR_RECORD, load_images

ROOT = Path(__file__).resolve().parents[1]


def rgb(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_folder(root: Path, classes: dict[str, int], start: int = 0) -> dict[str, list]:
    """``count`` PNG images per class under ``root/<class>/``; returns the pixels written."""
    written: dict[str, list] = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(count):
            pixels = rgb(start + 100 * len(written) + i)
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")
            written[name].append(pixels)
    return written


def same_images(examples, written: dict[str, list], names: tuple[str, ...]) -> None:
    """The examples are exactly the written images, each under its class's index."""
    got = sorted((ex.label, ex.pixels.tobytes()) for ex in examples)
    want = sorted((names.index(c), p.tobytes()) for c, images in written.items() for p in images)
    assert got == want


# --------------------------------------------------------------------------- image folders


def test_a_folder_of_class_folders_reads_pixels_and_sorted_labels(tmp_path: Path) -> None:
    written = write_folder(tmp_path / "pets", {"dog": 3, "ant": 5, "cat": 4})
    (tmp_path / "pets" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    (tmp_path / "pets" / "cat" / ".hidden").write_bytes(b"\0")
    train, test, names, where = load_images(tmp_path / "pets")
    assert names == ("ant", "cat", "dog") and test is None and "3 classes" in where
    assert all(ex.pixels.dtype == np.uint8 and ex.pixels.shape == (6, 5, 3) for ex in train)
    same_images(train, written, names)
    # through the task loader: a seeded stratified split of the same images
    data = load_task_data(str(tmp_path / "pets"), task="image-classification", seed=0)
    assert data.kind == "image-classification" and data.label_names == names
    assert data.num_labels == 3 and len(data.train) + len(data.test) == 12
    assert {ex.label for ex in data.test} == {0, 1, 2}  # stratified: every class in test
    same_images(data.train + data.test, written, names)


def test_train_and_test_folders_and_image_modes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    train_written = write_folder(root / "train", {"b": 2, "a": 2})
    test_written = write_folder(root / "test", {"a": 1}, start=7)
    gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    Image.fromarray(gray, mode="L").save(root / "train" / "b" / "gray.png")
    train_written["b"].append(np.repeat(gray[:, :, None], 3, axis=2))  # mixed: all RGB
    rgba = np.dstack([rgb(3), np.full((6, 5), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "train" / "a" / "alpha.PNG")
    train_written["a"].append(rgba[:, :, :3])  # alpha dropped
    smooth = np.stack([*np.meshgrid(np.arange(5) * 40, np.arange(6) * 30), np.full((6, 5), 90)], 2)
    smooth = smooth.astype(np.uint8)  # JPEG is lossy: a smooth image comes back close
    Image.fromarray(smooth).save(root / "train" / "a" / "photo.jpg", quality=95, subsampling=0)
    train, test, names, _ = load_images(root)
    assert names == ("a", "b")
    assert all(ex.pixels.shape == (6, 5, 3) for ex in train)  # one layout: RGB
    pngs = [p for images in train_written.values() for p in images]
    jpeg = [ex for ex in train if not any(np.array_equal(ex.pixels, p) for p in pngs)]
    assert len(jpeg) == 1 and jpeg[0].label == 0  # lossy: close to what was written
    assert np.abs(jpeg[0].pixels.astype(int) - smooth).mean() < 6
    same_images([ex for ex in train if ex is not jpeg[0]], train_written, names)
    same_images(test, test_written, names)
    # every image grayscale: (H, W) arrays, the grayscale model's layout
    for path in root.rglob("*.*"):
        path.unlink()
    for name, value in (("a", 10), ("b", 200)):
        Image.fromarray(np.full((4, 4), value, np.uint8), mode="L").save(
            root / "train" / name / "x.png"
        )
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(root / "test" / "a" / "deep.png")
    train, test, _, _ = load_images(root)
    assert sorted(int(ex.pixels[0, 0]) for ex in train) == [10, 200]
    assert all(ex.pixels.shape == (4, 4) for ex in train)
    (deep,) = test  # 16-bit grayscale, scaled to 8 bits
    assert deep.pixels.shape == (4, 4) and int(deep.pixels[0, 0]) == 40000 // 257


def test_images_of_different_sizes_are_each_resized_for_the_model(tmp_path: Path) -> None:
    root = tmp_path / "sizes"
    for name, shape in (("big", (12, 10, 3)), ("small", (6, 5, 3))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full(shape, 50 * (i + 1), np.uint8)).save(root / name / f"{i}.png")
    train, _, _, _ = load_images(root)
    dataset = encode_examples(train, image_size=8, num_channels=3)
    pixels = dataset.pixels if hasattr(dataset, "pixels") else dataset[0]["pixel_values"]
    assert tuple(pixels.shape[-3:]) == (3, 8, 8)
    # a constant image stays constant: (50 / 255 − 0.5) / 0.5
    values = {round(float(dataset[i]["pixel_values"].mean()), 4) for i in range(4)}
    assert values == {round((v / 255 - 0.5) / 0.5, 4) for v in (50, 100)}


# --------------------------------------------------------------------------- CIFAR-100 binary


def cifar_records(labels: list[tuple[int, int]], seed: int) -> tuple[bytes, np.ndarray]:
    """Records of (coarse, fine) labels with random pixels; returns the bytes and the pixels
    (N, 3072) as written (red plane, green plane, blue plane, each row-major 32×32)."""
    planes = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    data = b"".join(bytes([c, f]) + p.tobytes() for (c, f), p in zip(labels, planes, strict=True))
    return data, planes


def test_cifar100_binary_records_decode_to_pixels_and_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    train_labels = [(3, 7), (19, 99), (0, 0), (3, 7)]
    data, planes = cifar_records(train_labels, seed=0)
    (folder / "train.bin").write_bytes(data)
    test_data, test_planes = cifar_records([(1, 42)], seed=1)
    (folder / "test.bin").write_bytes(test_data)
    names = [f"class{i}" for i in range(100)]
    (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    train, test, label_names, where = load_images(folder)
    assert label_names == tuple(names) and "CIFAR-100 binary" in where
    assert [ex.label for ex in train] == [7, 99, 0, 7] and [ex.label for ex in test] == [42]
    for ex, plane in zip(train + test, [*planes, *test_planes], strict=True):
        assert ex.pixels.shape == (32, 32, 3) and ex.pixels.dtype == np.uint8
        for c in range(3):  # pixel (i, j) of channel c is byte c·1024 + 32 i + j
            for i, j in ((0, 0), (5, 17), (31, 31)):
                assert ex.pixels[i, j, c] == plane[c * 1024 + 32 * i + j]
    data = load_task_data(str(folder), task="image-classification", seed=0)
    assert data.num_labels == 100 and len(data.train) == 4 and len(data.test) == 1
    # one .bin file alone: labels named 0..99, split by the caller
    train, test, label_names, _ = load_images(folder / "train.bin")
    assert test is None and label_names[42] == "class42"  # the names file beside it


# --------------------------------------------------------------------------- bad input


def refused(path: Path, match: str, task: str = "image-classification") -> str:
    with pytest.raises(ValueError, match=match) as error:
        load_task_data(str(path), task=task, seed=0)
    message = str(error.value)
    assert "\n" not in message and "data.name" in message, message
    return message


def test_bad_image_data_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no class subfolders")
    write_folder(tmp_path / "odd", {"a": 1, "b": 1})
    (tmp_path / "odd" / "b" / "notes.gif").write_bytes(b"GIF89a")
    refused(tmp_path / "odd", r"notes\.gif is not an image file .*\.png, \.jpg, \.jpeg")
    write_folder(tmp_path / "hollow", {"a": 1})
    (tmp_path / "hollow" / "b").mkdir()
    refused(tmp_path / "hollow", "class folder .* holds no .png/.jpg/.jpeg images")
    write_folder(tmp_path / "one", {"a": 2})
    refused(tmp_path / "one", "only one class folder")
    write_folder(tmp_path / "corrupt", {"a": 1, "b": 1})
    (tmp_path / "corrupt" / "a" / "bad.png").write_bytes(b"not a png")
    refused(tmp_path / "corrupt", "bad.png is not a readable image")
    split = tmp_path / "split"
    write_folder(split / "train", {"a": 1, "b": 1})
    write_folder(split / "test", {"c": 1})
    refused(split, r"has classes \['c'\] that .* lacks")
    refused(tmp_path / "missing", "no such file, folder or shipped dataset")
    # the text loader is not handed images
    refused(
        tmp_path / "odd", 'holds images; set model.task = "image-classification"', "classification"
    )


def test_cifar_pickles_and_broken_binaries_are_refused(tmp_path: Path) -> None:
    python = tmp_path / "cifar-100-python"
    python.mkdir()
    for name in ("train", "test", "meta"):  # what the pickled version holds
        (python / name).write_bytes(pickle.dumps({"data": [1, 2, 3]}, protocol=2))
    message = refused(python, "pickled python version")
    assert "cifar-100-binary" in message and "never unpickles" in message
    refused(python / "train", "pickled python version")  # one of its files
    (tmp_path / "cifar.tar.gz").write_bytes(b"\x1f\x8b")
    refused(tmp_path / "cifar.tar.gz", "an archive; extract it")
    short = tmp_path / "short"
    short.mkdir()
    (short / "train.bin").write_bytes(b"\0" * (CIFAR_RECORD + 5))
    refused(short, "not a whole number of 3074-byte CIFAR-100 records")
    (short / "train.bin").write_bytes(b"\0" * 3073 * 2)
    refused(short, "CIFAR-10's binary records are 3073 bytes")
    data, _ = cifar_records([(0, 100), (0, 1)], seed=0)
    (short / "train.bin").write_bytes(data)
    refused(short, "fine label 100; CIFAR-100 labels are 0..99")
    data, _ = cifar_records([(0, 5), (0, 5)], seed=0)
    (short / "train.bin").write_bytes(data)
    refused(short, "only one class")


# --------------------------------------------------------------------------- the paper config


@pytest.mark.usefixtures("single_torch_thread")
def test_the_vit_cifar100_paper_config_dry_runs_on_cifar_binary_files(tmp_path: Path) -> None:
    """examples/paper/vit_cifar100.toml with its data.name pointing at CIFAR-100 binary files
    (and a tiny 3-channel ViT for the model): the dry run reads and checks the data; without
    the files it refuses in one line naming data.name."""
    from transformers import ViTConfig, ViTForImageClassification

    from raflora.cli import app

    model = tmp_path / "vit"
    ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  num_labels=100)
    ).save_pretrained(model)  # fmt: skip
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("train.bin", 1000), ("test.bin", 100)):
        labels = [(0, int(f)) for f in rng.permutation(np.arange(count) % 100)]
        (folder / name).write_bytes(cifar_records(labels, seed=count)[0])
    config = ROOT / "examples" / "paper" / "vit_cifar100.toml"
    common = [
        "--set",
        f"model.path={model}",
        "--set",
        "model.dtype=float32",
        "--set",
        "simulation.num_gpus_per_client=0",
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(
        app, ["run", str(config), "--set", f"data.name={folder}", *common, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "ok: paper-vit-cifar100" in result.output
    assert "1000 train / 100 test examples" in result.output
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(
        app, ["run", str(config), "--set", f"data.name={missing}", *common, "--dry-run"]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "data.name" in lines[0], result.output
