"""Shared fixtures. Plumbing tests use the tiny random backbone; transfer-learning tests use
the real EfficientNet-Lite0 ImageNet weights from PyPI."""

from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import ExtractConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.models.fingerprint import Fingerprint

TEST_DEVICE = os.environ.get("HEADSTART_TEST_DEVICE", "cpu")

# What ``--precision auto`` resolves to on the CPU, forced for the whole suite. CI machines differ
# (AMX, avx512_bf16, neither), so auto gives fp32 on one and bf16 on another; every accuracy-style
# test must pass under both:  HEADSTART_TEST_PRECISION=fp32 make test  /  =bf16 make test.
TEST_PRECISION = os.environ.get("HEADSTART_TEST_PRECISION", "")

# Tests marked ``must_run`` may skip on a developer's machine (no root to install Chromium, say),
# but under CI (.ci/run sets HEADSTART_REQUIRE_MUST_RUN=1) a skip of one is a failure.
REQUIRE_MUST_RUN = os.environ.get("HEADSTART_REQUIRE_MUST_RUN") == "1"


def pytest_configure(config: pytest.Config) -> None:
    # The ONNX graphs models.engine exports are kept in a cache directory: one per test session,
    # never the user's ~/.cache (subprocesses inherit it through the environment).
    if "HEADSTART_CACHE_DIR" not in os.environ:
        os.environ["HEADSTART_CACHE_DIR"] = tempfile.mkdtemp(prefix="headstart-test-cache-")
        atexit.register(shutil.rmtree, os.environ["HEADSTART_CACHE_DIR"], True)
    if TEST_PRECISION:
        if TEST_PRECISION not in ("fp32", "bf16"):
            raise pytest.UsageError(f"HEADSTART_TEST_PRECISION must be fp32 or bf16, not {TEST_PRECISION!r}")
        from pipeline.core import runtime

        # resolve_precision looks this up at call time, so "auto" on the CPU follows the override.
        runtime.cpu_has_fast_bf16 = lambda: TEST_PRECISION == "bf16"
        if TEST_PRECISION == "bf16":  # bf16 runs in PyTorch only: --engine auto must not pick onnxruntime
            from pipeline.models import engine

            engine.onnxruntime_available = lambda: False


def pytest_report_header(config: pytest.Config) -> str:
    from pipeline.core import runtime

    forced = f" (forced by HEADSTART_TEST_PRECISION={TEST_PRECISION})" if TEST_PRECISION else ""
    return f"headstart: --precision auto on this CPU -> {'bf16' if runtime.cpu_has_fast_bf16() else 'fp32'}{forced}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_MUST_RUN and report.skipped and item.get_closest_marker("must_run") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} is marked must_run and was skipped under CI: {reason}"


def copy_sample_photos(
    root: Path, per_class: int = 6, classes: tuple[str, ...] = ("bag", "sneaker", "trouser")
) -> Path:
    """Copy ``per_class`` real Fashion-MNIST photos of each class into ``root/<class>/``."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))[:per_class]:
            shutil.copy(p, root / cls / p.name)
    return root


def run_headstart(
    *args: object,
    limits: dict[int, int] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` in a child process, as a user runs it, under ``limits``
    (``{resource.RLIMIT_AS: bytes, ...}``, set in the child before it starts). Python ignores
    SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG, as a full disk does with ENOSPC."""

    def apply() -> None:
        for which, value in (limits or {}).items():
            resource.setrlimit(which, (value, value))

    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=apply,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


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


@pytest.fixture
def own_registry(tmp_path, monkeypatch):
    """A local backbone registry (and ONNX graph cache) of the test's own: imports made by one
    test are invisible to the next (``pytestmark = pytest.mark.usefixtures("own_registry")``)."""
    from pipeline.models import hub

    monkeypatch.setenv("HEADSTART_CACHE_DIR", str(tmp_path / "headstart-cache"))
    hub.forget()
    yield
    hub.forget()


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


def extract_config(images: Path, out: Path, **kw: object) -> ExtractConfig:
    """An ``extract`` run on the tiny backbone, fp32 (same features on every CPU), in process."""
    base: dict[str, object] = dict(backbone="tiny", precision="fp32", workers=0, progress=False)
    base.update(kw)
    return ExtractConfig(images=str(images), out=str(out), **base)  # type: ignore[arg-type]


def age_files(root: Path) -> None:
    """Give every file under ``root`` an mtime an hour ago: freshly written files are 'racy'
    (statcache.RACY_NS) and never kept in the stat cache."""
    t = time.time_ns() - 3600 * 10**9
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(t, t))


def synthetic_fingerprint(dim: int) -> Fingerprint:
    """The fingerprint of rows made up by a test, of width ``dim`` (no backbone behind them)."""
    prep = {"crop": 32, "draft": True, "interpolation": "bilinear", "letterbox": False}
    prep.update(mean=[0.5] * 3, resize=40, std=[0.5] * 3)
    record = dict(backbone="synthetic", weights="random", weights_sha256="none", precision="fp32")
    return Fingerprint.from_record({**record, "preprocessing": json.dumps(prep), "feature_dim": dim}, source="test")
