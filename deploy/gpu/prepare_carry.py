"""Build ``.devdata/``: what a bare GPU machine needs to train the nuclear model.

The training images of the nuclear recipe (``pipeline/convnet/recipes/nuclei_unet.yaml``), with
every held-out image replaced by an empty file (the recipe's exclude list must still name an
image, and excluded images are never read), and Python 3.12 wheels of the packages that
``pipeline.convnet.training`` imports beyond a CUDA PyTorch image (dask, pydantic).
Everything fits the 64 MiB a device call carries. Run from the repository root:

    python deploy/gpu/prepare_carry.py ../shared/data/segmentation

then, on the GPU machine, ``bash deploy/gpu/train_nuclei_widths.sh`` (it reads ``.devdata``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

FOLDERS = ("dsb2018", "gowt1", "hela")
HELD_OUT_CTC = {"gowt1": {"t21.tif", "t72.tif"}, "hela": {"t52.tif", "t79.tif"}}
WHEELS = ("dask", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")


def held_out_names(validation_list: Path) -> set[str]:
    """File names of the dsb2018 validation split (``dsb2018/NAME.tif  # group`` lines)."""
    names = set()
    for line in validation_list.read_text().splitlines():
        entry = line.split("#")[0].strip()
        if entry:
            names.add(entry.rsplit("/", 1)[-1])
    return names


def main(source: Path, target: Path = Path(".devdata")) -> None:
    held = {"dsb2018": held_out_names(Path("pipeline/convnet/recipes/dsb2018_validation.txt"))}
    held |= HELD_OUT_CTC
    for folder in FOLDERS:
        for sub in ("images", "masks"):
            (target / "segmentation" / folder / sub).mkdir(parents=True, exist_ok=True)
            for path in (source / folder / sub).iterdir():
                copy = target / "segmentation" / folder / sub / path.name
                if path.name in held[folder]:
                    copy.write_bytes(b"")
                else:
                    shutil.copyfile(path, copy)
        for path in (source / folder).glob("*.csv"):
            shutil.copyfile(path, target / "segmentation" / folder / path.name)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    platform = ["--python-version", "3.12", "--platform", "manylinux2014_x86_64"]
    subprocess.run([*download, *platform, "-d", str(target / "wheels"), *pins], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
