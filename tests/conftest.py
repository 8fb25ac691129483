"""Shared fixtures: the real models and COCO images live in ../shared (or $ONNXQ_SHARED)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXQ_SHARED", REPO.parent / "shared")).resolve()
MODELS_DIR = SHARED / "models"
CALIB_DIR = SHARED / "data" / "coco128_train2017"
VAL_DIR = SHARED / "data" / "coco_val2017_first128"

MODEL_FILES = sorted(p.name for p in MODELS_DIR.glob("*.onnx")) if MODELS_DIR.is_dir() else []


def _require(path):
    if not path.exists():
        pytest.fail(f"{path} is missing: set ONNXQ_SHARED to the folder holding models/ and data/")
    return path


@pytest.fixture(scope="session")
def shared_dir():
    return _require(SHARED)


@pytest.fixture(scope="session")
def models_dir():
    return _require(MODELS_DIR)


@pytest.fixture(scope="session")
def calib_images():
    return _require(CALIB_DIR / "images")


@pytest.fixture(scope="session")
def val_dir():
    return _require(VAL_DIR)
