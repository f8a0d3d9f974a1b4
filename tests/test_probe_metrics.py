"""The numpy classification metrics give scikit-learn's numbers exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from pipeline.probe.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(6))
def test_the_same_numbers_as_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    n = int(rng.integers(1, 80))
    y = rng.integers(0, k, n)
    y[y == k - 1] = 0  # the last class has no photos: support 0, left out of the macro average
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    names = [f"c{i}" for i in range(k)]
    m = classification_metrics(y, pred, names)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    present = [i for i in range(k) if s[i] > 0]
    assert m["accuracy"] == accuracy_score(y, pred)
    assert m["macro_f1"] == f1_score(y, pred, labels=present, average="macro", zero_division=0)
    assert m["classes_without_photos"] == [names[i] for i in range(k) if s[i] == 0]
    assert f"c{k - 1}" in m["classes_without_photos"] and m["macro_f1_classes"] == len(present)
    for i, name in enumerate(names):
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == (p[i], r[i], f[i], s[i])
