"""Peak memory of decoding hostile images, each in a fresh child process (VmHWM, peak resident memory, imports
included): a 475-byte 1 x 100,000 PNG (the aspect-ratio bomb) through the Lite0 recipe, centre
crop and letterbox, and a 16-bit 12000 x 12000 greyscale PNG.

    python bench/decode_memory.py [--workdir artifacts/bench/decode_memory]

Run it with another checkout first on PYTHONPATH to measure an older release the same way
(a child that fails prints its error instead of a figure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys
from pipeline.data.images import load_pixels
from pipeline.models.backbones import get_spec, with_preprocessing
prep = get_spec("efficientnet_lite0").preprocessing
if sys.argv[2] == "letterbox":
    prep = with_preprocessing(get_spec("efficientnet_lite0"), letterbox=True).preprocessing
x = load_pixels(sys.argv[1], prep)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(f"{peak / 1024:.0f} MB", tuple(x.shape))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="artifacts/bench/decode_memory")
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    strip = work / "strip.png"
    Image.new("RGB", (1, 100_000), (200, 30, 60)).save(strip, optimize=True)
    grey16 = work / "grey16.png"
    if not grey16.exists():
        Image.fromarray(np.zeros((12000, 12000), dtype=np.uint16)).save(grey16)
    cases = [(strip, "crop"), (strip, "letterbox"), (grey16, "crop")]
    for path, mode in cases:
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True)
        what = r.stdout.strip() or (r.stderr.strip().splitlines() or [""])[-1] + f" (exit status {r.returncode})"
        print(f"{path.name} ({path.stat().st_size:,} bytes), {mode}: {what}")


if __name__ == "__main__":
    main()
