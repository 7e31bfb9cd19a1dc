"""Copy the small real-data fixtures under tests/data/ from the RSICD and UCM-Captions samples.

Usage: python tests/data/make_fixtures.py SOURCE_DIR
SOURCE_DIR contains rsicd/data/*.parquet (Hub layout of arampacha/rsicd) and ucm-captions/
(Karpathy layout). The subset is a seeded random choice, so rerunning gives the same files.
"""

import json
import random
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

RSICD_IMAGES = {"train": 48, "valid": 12, "test": 16}
UCM_IMAGES = {"train": 3, "val": 2, "test": 2}
# Images that are not 256x256, kept so the fixture covers off-size UCM TIFFs.
UCM_OFF_SIZE = ["1963.tif", "1789.tif"]
SEED = 0


def copy_rsicd(source: Path, target: Path) -> None:
    (target / "data").mkdir(parents=True, exist_ok=True)
    for split, count in RSICD_IMAGES.items():
        name = f"{split}-00000-of-00001.parquet"
        table = pq.read_table(source / "data" / name)
        rows = sorted(random.Random(SEED).sample(range(table.num_rows), count))
        # take() keeps the schema metadata through which `datasets` reads the image column as an Image feature.
        pq.write_table(table.take(rows), target / "data" / name)


def copy_ucm(source: Path, target: Path) -> None:
    dataset = json.loads((source / "dataset.json").read_text())
    rng = random.Random(SEED)
    chosen = [image for image in dataset["images"] if image["filename"] in UCM_OFF_SIZE]
    for split, count in UCM_IMAGES.items():
        candidates = [
            image
            for image in dataset["images"]
            if image["split"] == split and image["filename"] not in UCM_OFF_SIZE
        ]
        chosen += rng.sample(candidates, count)
    (target / "imgs").mkdir(parents=True, exist_ok=True)
    for image in chosen:
        shutil.copyfile(source / "imgs" / image["filename"], target / "imgs" / image["filename"])
    (target / "dataset.json").write_text(json.dumps({"dataset": dataset["dataset"], "images": chosen}))


if __name__ == "__main__":
    source = Path(sys.argv[1])
    here = Path(__file__).resolve().parent
    copy_rsicd(source / "rsicd", here / "rsicd-mini")
    copy_ucm(source / "ucm-captions", here / "ucm-mini")
