"""Photos in, pixels out: preprocessing, discovery and safe decoding, loaders (CPU and GPU
decode), training augmentation, label maps; and the bundled sample catalog."""
