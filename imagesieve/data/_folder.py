"""ImageFolder reading: one sub-folder per class, optionally pre-split into train/val/test."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from imagesieve._errors import NotFoundError, UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "Sample",
    "SkippedFile",
    "scan_image_folder",
    "sort_into",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image file; ``split`` is set when the folder was pre-split."""

    path: Path
    label: str
    split: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a dataset, with the one-line reason."""

    path: Path
    reason: str


@dataclass
class ImageFolder:
    """The labelled images found under a root folder."""

    root: Path
    samples: list[Sample]
    classes: list[str]
    presplit: bool
    skipped: list[SkippedFile] = field(default_factory=list)

    def fingerprint(self) -> str:
        """SHA-256 over (relative path, label, split, size, mtime) of every sample, in order."""
        h = hashlib.sha256()
        for s in self.samples:
            st = s.path.stat()
            rel = s.path.relative_to(self.root).as_posix()
            h.update(f"{rel}\0{s.label}\0{s.split}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        out = dict.fromkeys(self.classes, 0)
        for s in self.samples:
            out[s.label] += 1
        return out


def _scan_classes(folder: Path, split: str | None, root: Path) -> tuple[list, list]:
    samples, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if split is not None or path.parent == root:
            skipped.append(SkippedFile(path, "not inside a class folder"))
    for class_dir in sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        for path in sorted(class_dir.rglob("*")):
            if path.is_dir() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append(Sample(path, class_dir.name, split))
            else:
                skipped.append(
                    SkippedFile(path, f"not an image file extension ({path.suffix or 'none'})")
                )
    return samples, skipped


def scan_image_folder(root: str | Path) -> ImageFolder:
    """List the labelled images under ``root`` without decoding them.

    ``root`` holds one sub-folder per class, or ``train/`` (required), ``val/`` and ``test/``
    each holding class sub-folders. Files with non-image extensions are listed in ``skipped``;
    files that fail to decode are reported later by whoever decodes them.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"data folder not found: {root}")
    presplit = (root / "train").is_dir()
    samples, skipped = [], []
    if presplit:
        for split in SPLITS:
            if (root / split).is_dir():
                found, bad = _scan_classes(root / split, split, root)
                samples += found
                skipped += bad
    else:
        samples, skipped = _scan_classes(root, None, root)
    classes = sorted({s.label for s in samples})
    if not samples:
        raise UserError(
            f"no images found in {root}: expected one sub-folder per class "
            f"(e.g. {root}/cats/*.jpg), or train/ val/ test/ folders holding class sub-folders"
        )
    if presplit:
        missing = sorted(
            {s.label for s in samples if s.split != "train"}
            - {s.label for s in samples if s.split == "train"}
        )
        if missing:
            raise UserError(
                f"classes {', '.join(missing)} have no images under {root / 'train'}; "
                "every class needs training images"
            )
    return ImageFolder(root, samples, classes, presplit, skipped)


def _safe_part(name: str) -> str:
    """A label or file name usable as one path component (no separators, no leading dots)."""
    name = re.sub(r"[\\/\x00-\x1f]", "_", name).strip().lstrip(".")
    return name or "_"


def sort_into(
    root: str | os.PathLike, label: str, filename: str, source: str | bytes, sha256: str
) -> Path:
    """Copy an image into ``root/<label>/<filename>``, never overwriting.

    A name already taken by other content gets a numeric suffix (``name_1.png``); the same
    content already there is not copied again, so re-running a command adds no duplicates.
    """
    folder = Path(root) / _safe_part(label)
    folder.mkdir(parents=True, exist_ok=True)
    stem, ext = os.path.splitext(_safe_part(filename))
    for n in itertools.count():
        target = folder / (f"{stem}{ext}" if n == 0 else f"{stem}_{n}{ext}")
        try:
            out = open(target, "xb")  # exclusive create: never overwrite
        except FileExistsError:
            with open(target, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() == sha256:
                    return target
            continue
        with out:
            if isinstance(source, bytes):
                out.write(source)
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out)
        return target
    raise AssertionError("unreachable")
