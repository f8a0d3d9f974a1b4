"""Shared fixtures. Plumbing tests use the tiny random backbone; transfer-learning tests use
the real EfficientNet-Lite0 ImageNet weights from PyPI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.demo import SAMPLE_CATALOG

TEST_DEVICE = os.environ.get("HEADSTART_TEST_DEVICE", "cpu")


def copy_sample_photos(
    root: Path, per_class: int = 6, classes: tuple[str, ...] = ("bag", "sneaker", "trouser")
) -> Path:
    """Copy ``per_class`` real Fashion-MNIST photos of each class into ``root/<class>/``."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))[:per_class]:
            shutil.copy(p, root / cls / p.name)
    return root


@pytest.fixture
def small_catalog(tmp_path: Path) -> Path:
    """3 classes x 6 real Fashion-MNIST photos, copied so tests may modify the folder."""
    return copy_sample_photos(tmp_path / "images")


@pytest.fixture
def run_cli():
    """Invoke the click CLI in-process and return the result."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    def _run(*args: str, **kw):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)

    return _run


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory) -> Path:
    """A head fitted on tiny-backbone features of 3 classes x 6 real photos (export/predict
    plumbing). Session-scoped: copy it before modifying it."""
    from pipeline.config import ExtractConfig, FitHeadConfig
    from pipeline.extract import extract
    from pipeline.fit_head import fit_head

    root = tmp_path_factory.mktemp("tiny_head")
    images = copy_sample_photos(root / "images")
    cache = root / "features.h5"
    extract(ExtractConfig(images=str(images), out=str(cache), backbone="tiny", progress=False, workers=0))
    # Random tiny features are all "near duplicates"; keep the split plain, C fixed for speed.
    fit_head(FitHeadConfig(cache=str(cache), out=str(root / "head"), c=0.01, near_duplicate_threshold=None))
    return root / "head"
