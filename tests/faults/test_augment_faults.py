"""Fine-tuning's augmentation obeys the same memory bound as decoding (issue 18, item 2): a
1 x 100,000 strip would resize to 256 x 25,600,000 (about 20 GB) or a 100,000² letterbox
canvas. Run in a child process allowed 2 GiB of address space beyond its imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys
from PIL import Image
from pipeline.data.augment import augment, sample_generator
from pipeline.models.backbones import get_spec
# 2 GiB more than the imports mapped (torch maps a lot of address space it never touches).
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
prep = get_spec("efficientnet_lite0").preprocessing
for size in ((1, 100_000), (100_000, 1)):
    strip = Image.new("RGB", size, (200, 30, 60))
    for preset in ("product", "letterbox", "none"):
        x = augment(strip, prep, preset, sample_generator(0, 0, 0))
        assert tuple(x.shape) == (3, prep.crop, prep.crop), x.shape
        print(preset, size, "ok")
"""


@pytest.mark.slow  # 10-20 s under a memory limit; decoding's aspect-ratio bomb tests stay in the default suite
def test_an_extreme_aspect_ratio_is_augmented_in_bounded_memory():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("ok") == 6, r.stdout + r.stderr[-2000:]
