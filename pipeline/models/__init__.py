"""Networks: the backbone registry, the inference network (BatchNorm folding), the torch head
modules, and the :class:`~pipeline.models.fingerprint.Fingerprint` of a backbone's features."""
