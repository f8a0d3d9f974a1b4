"""Layer 0: machinery every other layer uses - atomic writes, hashing, device and precision,
torch.distributed. Imports nothing else from the package but ``errors``."""
