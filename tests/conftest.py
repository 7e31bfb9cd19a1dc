"""Shared fixtures: the repository's real-data samples and a small fresh BLIP built from them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RSICD_MINI = REPO / "tests" / "data" / "rsicd-mini"
UCM_MINI = REPO / "tests" / "data" / "ucm-mini"

# Nothing in the tests may wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A small BLIP with fresh weights and a tokenizer built from the RSICD fixture's captions."""
    output_dir = tmp_path_factory.mktemp("small-blip")
    subprocess.run(
        [sys.executable, str(REPO / "model.py"), "init-small", "--data", str(RSICD_MINI), "--output-dir", str(output_dir)],
        check=True,
        timeout=300,
    )
    return output_dir
