"""Image data from local files: a folder of class subfolders, or CIFAR-100's binary version.

- **Image folder**: ``<root>/<class>/*.png|jpg|jpeg`` (one split: the caller splits it seeded
  and stratified), or ``<root>/train/<class>/…`` with ``<root>/test/<class>/…`` (or
  ``validation``, ``val``, ``dev``). Classes are the train split's subfolder names in sorted
  order (label i = the i-th name); a test class that training lacks is refused. Images are
  read with Pillow into ``uint8`` arrays: (H, W) when every image of the folder is grayscale,
  else (H, W, 3) RGB (palette, alpha and 16-bit images are converted). Files whose names
  start with ``.`` are ignored; any other file with another extension is refused.
- **CIFAR-100 binary** (``cifar-100-binary.tar.gz`` extracted): a folder with ``train.bin``
  and ``test.bin`` (or one ``.bin`` file, then split by the caller), each a sequence of
  3074-byte records: 1 coarse label byte, 1 fine label byte, 3072 pixel bytes (1024 red, 1024
  green, 1024 blue, row-major 32×32). Labels are the 100 fine classes, named by
  ``fine_label_names.txt`` when the folder has it. The pickled "python version" is refused:
  nothing here unpickles.

Every problem is a one-line ``ValueError`` naming ``data.name``, the path and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raflora.training.data.types import ImageExample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_TEST = ("test", "validation", "val", "dev")
CIFAR_RECORD = 3074  # 1 coarse + 1 fine label byte + 3 × 32 × 32 pixel bytes
CIFAR_FILES = ("train.bin", "test.bin")

# (train, test or None, class names, where)
Images = tuple[list[ImageExample], list[ImageExample] | None, tuple[str, ...], str]


def _field(path: Path) -> str:
    return f"data.name {str(path)!r}"


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _pickled_refusal(path: Path) -> ValueError:
    return ValueError(
        f"{_field(path)}: this is CIFAR's pickled python version, which raflora does not read "
        "(it never unpickles); download cifar-100-binary.tar.gz, extract it and point "
        "data.name at its folder (train.bin, test.bin), or use a folder of class subfolders "
        "of .png/.jpg images"
    )


def _is_pickle(path: Path) -> bool:
    """A file that starts like a pickle (protocol 2+: byte 0x80, then the protocol)."""
    with path.open("rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def refuse_pickled(path: Path) -> None:
    """Raise if ``path`` is (a folder of) CIFAR's pickled version or any pickle file."""
    if path.is_file():
        if path.suffix in (".pkl", ".pickle") or _is_pickle(path):
            raise _pickled_refusal(path)
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise ValueError(
                f"{_field(path)}: an archive; extract it and point data.name at the folder "
                "(CIFAR-100: the binary version's train.bin/test.bin)"
            )
        return
    if path.is_dir():
        names = {p.name for p in path.iterdir() if p.is_file()}
        if ("meta" in names and names & {"train", "test"}) or "batches.meta" in names:
            raise _pickled_refusal(path)


def is_cifar_binary(path: Path) -> bool:
    """A CIFAR-100 binary folder (``train.bin``) or a single ``.bin`` file."""
    if path.is_file():
        return path.suffix == ".bin"
    return path.is_dir() and (path / "train.bin").is_file()


def _class_folders(root: Path) -> list[Path]:
    return [p for p in _visible(root) if p.is_dir()]


def is_image_folder(path: Path) -> bool:
    """A folder whose subfolders (or those of its ``train/``) hold images."""
    if not path.is_dir():
        return False
    root = path / "train" if (path / "train").is_dir() else path
    return any(
        f.suffix.lower() in IMAGE_SUFFIXES
        for folder in _class_folders(root)
        for f in folder.iterdir()
        if f.is_file()
    )


def holds_images(path: Path) -> bool:
    """Whether ``path`` is image data this module reads."""
    return is_cifar_binary(path) or is_image_folder(path)


# --------------------------------------------------------------------------- CIFAR-100 binary


def read_cifar_file(file: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (N, 32, 32, 3) uint8, fine labels (N,) int64)`` of one CIFAR-100 .bin file."""
    data = np.fromfile(file, dtype=np.uint8)
    if data.size == 0 or data.size % CIFAR_RECORD:
        hint = " (CIFAR-10's binary records are 3073 bytes; only CIFAR-100 is read)"
        raise ValueError(
            f"{field}: {file} has {data.size} bytes, not a whole number of {CIFAR_RECORD}-byte "
            f"CIFAR-100 records (1 coarse + 1 fine label byte + 3072 pixels)"
            + (hint if data.size and data.size % 3073 == 0 else "")
        )
    records = data.reshape(-1, CIFAR_RECORD)
    fine = records[:, 1].astype(np.int64)
    if fine.max() >= 100:
        raise ValueError(
            f"{field}: {file} has fine label {int(fine.max())}; CIFAR-100 labels are 0..99"
        )
    pixels = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
    return np.ascontiguousarray(pixels), fine


def _cifar_names(folder: Path) -> tuple[str, ...]:
    names_file = folder / "fine_label_names.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) == 100:
            return tuple(names)
    return tuple(str(i) for i in range(100))


def _examples(pixels: np.ndarray, labels: np.ndarray) -> list[ImageExample]:
    return [ImageExample(pixels=p, label=int(y)) for p, y in zip(pixels, labels, strict=True)]


def load_cifar_binary(path: Path) -> Images:
    """CIFAR-100 binary: a folder with train.bin (+ test.bin) or one .bin file."""
    field = _field(path)
    if path.is_file():
        train = _examples(*read_cifar_file(path, field))
        return train, None, _cifar_names(path.parent), f"{path} (CIFAR-100 binary)"
    train = _examples(*read_cifar_file(path / "train.bin", field))
    test_file = path / "test.bin"
    test = _examples(*read_cifar_file(test_file, field)) if test_file.is_file() else None
    return train, test, _cifar_names(path), f"{path} (CIFAR-100 binary)"


# --------------------------------------------------------------------------- image folders


def _image_files(folder: Path, field: str) -> list[Path]:
    files = [p for p in _visible(folder) if p.is_file()]
    for file in files:
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{field}: {file} is not an image file this loader reads "
                f"({', '.join(IMAGE_SUFFIXES)}); remove or convert it"
            )
    if not files:
        raise ValueError(f"{field}: class folder {folder} holds no .png/.jpg/.jpeg images")
    return files


def _read_image(file: Path, field: str) -> tuple[np.ndarray, bool]:
    """``(pixels uint8, grayscale?)``: (H, W) for grayscale (16-bit scaled to 8), else
    (H, W, 3) RGB (palette and alpha images converted, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image.load()
            mode = image.mode
            if mode in ("I", "F"):
                raise ValueError(f"32-bit {mode} pixels; save it with 8-bit channels")
            if mode.startswith("I;16"):  # 16-bit grayscale: 0..65535 → 0..255
                pixels = np.asarray(image).astype(np.uint32) // 257
                return pixels.astype(np.uint8), True
            gray = mode in ("1", "L", "LA")
            pixels = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:120]
        raise ValueError(f"{field}: {file} is not a readable image ({reason})") from None
    return pixels, gray


def _read_split(
    root: Path, classes: list[str], field: str
) -> tuple[list[tuple[np.ndarray, bool]], list[int]]:
    images, labels = [], []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for file in _image_files(folder, field):
            images.append(_read_image(file, field))
            labels.append(index)
    return images, labels


def _split_classes(root: Path, field: str) -> list[str]:
    classes = [p.name for p in _class_folders(root)]
    if not classes:
        raise ValueError(
            f"{field}: {root} has no class subfolders; expected <folder>/<class>/*.png|jpg|jpeg "
            "(optionally under train/ and test/)"
        )
    return classes


def load_image_folder(path: Path) -> Images:
    """An image folder (see the module docstring)."""
    field = _field(path)
    if not path.is_dir():
        raise ValueError(f"{field}: no such folder")
    train_root = path / "train" if (path / "train").is_dir() else path
    test_root = next(
        (path / n for n in SPLIT_TEST if train_root != path and (path / n).is_dir()), None
    )
    classes = _split_classes(train_root, field)
    if len(classes) < 2:
        raise ValueError(
            f"{field}: only one class folder ({classes[0]!r}); classification needs at least 2"
        )
    train, train_labels = _read_split(train_root, classes, field)
    test: list[tuple[np.ndarray, bool]] = []
    test_labels: list[int] = []
    if test_root is not None:
        unknown = sorted(set(_split_classes(test_root, field)) - set(classes))
        if unknown:
            raise ValueError(
                f"{field}: {test_root} has classes {unknown} that {train_root} lacks; "
                "every test class needs a training folder"
            )
        test, test_labels = _read_split(test_root, classes, field)
    all_gray = all(gray for _, gray in train + test)

    def examples(images: list[tuple[np.ndarray, bool]], labels: list[int]) -> list[ImageExample]:
        out = []
        for (pixels, gray), label in zip(images, labels, strict=True):
            if gray and not all_gray:  # one channel layout for the whole folder
                pixels = np.repeat(pixels[:, :, None], 3, axis=2)
            out.append(ImageExample(pixels=pixels, label=label))
        return out

    where = f"{path} (image folder, {len(classes)} classes)"
    test_examples = examples(test, test_labels) if test_root is not None else None
    return examples(train, train_labels), test_examples, tuple(classes), where


def load_images(path: Path) -> Images:
    """Image data at ``path``: CIFAR-100 binary or an image folder; pickled CIFAR refused."""
    refuse_pickled(path)
    if is_cifar_binary(path):
        return load_cifar_binary(path)
    if path.is_dir():
        return load_image_folder(path)
    if path.is_file():
        raise ValueError(
            f"{_field(path)}: image data is a folder of class subfolders "
            "(<folder>/<class>/*.png|jpg|jpeg) or CIFAR-100's binary train.bin/test.bin"
        )
    raise ValueError(f"{_field(path)}: no such file, folder or shipped dataset")
