"""The ELPV solar-cell images (PyPI ``elpv-dataset``) as ImageFolders for the demo and tests."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from imagesieve._errors import UserError

__all__ = ["ElpvImage", "elpv_images", "export_elpv"]


@dataclass(frozen=True)
class ElpvImage:
    """One ELPV cell: file, defect probability (0, 1/3, 2/3, 1) and cell type (mono/poly)."""

    path: Path
    defect_probability: float
    cell_type: str

    @property
    def defective(self) -> bool:
        """The dataset paper's binary label: defect probability >= 0.5."""
        return self.defect_probability >= 0.5


def elpv_images() -> list[ElpvImage]:
    """All 2,624 ELPV images with their labels, from the installed ``elpv-dataset`` package."""
    try:
        import elpv_dataset
    except ImportError:
        raise UserError(
            "the ELPV images come from the elpv-dataset package: pip install 'imagesieve[demo]'"
        ) from None
    root = Path(elpv_dataset.__file__).parent / "data"
    out = []
    for line in (root / "labels.csv").read_text().splitlines():
        if line.strip():
            rel, prob, kind = line.split()
            out.append(ElpvImage(root / rel, float(prob), kind))
    return out


def export_elpv(
    dest: str | os.PathLike,
    images: list[ElpvImage],
    label_of=lambda im: "defective" if im.defective else "functional",
) -> Path:
    """Copy ``images`` into an ImageFolder at ``dest`` (``dest/<label>/cellNNNN.png``), once.

    Files already present are kept, so a second call is cheap.
    """
    dest = Path(dest)
    for im in images:
        target = dest / label_of(im) / im.path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(im.path, target)
    return dest
