"""Photos in, pixels out: preprocessing, discovery and safe decoding, loaders (CPU and GPU
decode), training augmentation, label maps; and the bundled sample catalog."""

from pathlib import Path

# Real Fashion-MNIST product photos shipped in the wheel (see its README.md): the demo's
# catalog, the parity check's fallback images and the tests' photos.
SAMPLE_CATALOG = Path(__file__).resolve().parent / "sample_catalog"
