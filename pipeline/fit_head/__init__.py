"""Stage: feature cache -> head directory. ``fit_head(cfg) -> FitSummary``.

1. Labels go through the label map (``--classes``): merge, rename, drop, stable class ids.
2. Validation split: stratified by class and grouped so near-duplicate photos (feature cosine
   above ``--near-duplicate-threshold``) stay on one side (``splits.py``).
3. Head: logistic regression with C swept on validation log-loss (default), an MLP, or nearest
   centroid (few-shot). A probe trained on the training rows gives the validation metrics and
   the temperature (scaling on validation log-loss); the final head is refit on train +
   validation and carries that temperature. (Why not calibrate the final head directly: it has
   seen every labelled photo, so nothing is left to calibrate it on honestly.)

Heads from text (image-text backbones only: :mod:`pipeline.models.text`): ``--head zeroshot``
is built from the class prompts of ``--classes`` (``[prompts]``; needs no photo: every labelled
one is a validation photo, only its temperature is fitted), and ``--text-prior WEIGHT`` keeps the
logistic head near that zero-shot head (:mod:`pipeline.probe.zeroshot`).

Attributes (:mod:`pipeline.data.attributes`): one head per manifest column in one run, the
multi-label ones one-vs-rest (:mod:`.multilabel`). The modules: :mod:`.stage` (the run),
:mod:`.single`, :mod:`.zeroshot`, :mod:`.multilabel` (one attribute's head each),
:mod:`.common` (what they share).

Writes ``HEAD_DIR/`` (``head.joblib``, ``head.npz``, ``head.json``, ``split.json``,
``config.json``; what each holds: :mod:`pipeline.artifacts.head_dir`, which writes it atomically).
The kinds (``--head``) and what each exports as: :mod:`pipeline.probe.kinds`.

Device: ``--device`` resolves once (:func:`resolve_solver`) and every fit uses the result - the
C sweep, the validation probe and the final refit alike.

Memory: in memory, about ``12 * N * D`` bytes for N labelled rows of D features (float32
features, the train/validation copies, scikit-learn's standardised copy). Above
``--max-memory-gb`` (default: half the available RAM) logistic regression streams the rows from
the cache in chunks on every L-BFGS pass (torch solver): slower, but memory is one chunk.
"""

from .common import BYTES_PER_VALUE_IN_MEMORY, CacheRows, FitSummary, memory_budget
from .stage import attribute_targets, fit_head, resolve_solver

__all__ = [
    "BYTES_PER_VALUE_IN_MEMORY",
    "CacheRows",
    "FitSummary",
    "attribute_targets",
    "fit_head",
    "memory_budget",
    "resolve_solver",
]
