"""The training loop on its own: a ``Trainer`` built from explicit parts, without a head
directory or the stage around it, on a few real sample photos and the tiny backbone (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pipeline.core.distributed import Dist
from pipeline.core.hashing import hash_file
from pipeline.data import SAMPLE_CATALOG
from pipeline.data.augment import resolve_preset
from pipeline.errors import InputError
from pipeline.finetune import checkpoint
from pipeline.finetune.data import Example, Split
from pipeline.finetune.layers import layer_groups
from pipeline.finetune.loop import BEST, LAST, Settings, Trainer
from pipeline.models.backbones import load_backbone
from pipeline.models.heads import Classifier

CLASSES = ["bag", "sneaker", "trouser"]
SETTINGS = Settings(
    epochs=1, batch=2, accum_steps=1, lr=1e-2, layer_decay=0.5, weight_decay=0.05, warmup=0.0,
    label_smoothing=0.0, class_weight=None, init="lp", unfreeze_every=0, patience=0, clip_grad=1.0,
    checkpoint_every=1, seed=0, workers=0, max_pixels=None, resume=False,
)  # fmt: skip


def _examples(start: int, per_class: int) -> list[Example]:
    out = []
    for label, name in enumerate(CLASSES):
        for p in sorted((SAMPLE_CATALOG / "train" / name).glob("*.png"))[start : start + per_class]:
            out.append(Example(str(p), label, hash_file(p)))
    return out


def _trainer(out: Path, settings: Settings, log: list[str], identity: dict[str, str]) -> tuple[Trainer, Classifier]:
    backbone = load_backbone("tiny")
    torch.manual_seed(0)
    model = Classifier(backbone.net, torch.nn.Linear(backbone.spec.feature_dim, len(CLASSES)))
    prep = backbone.spec.preprocessing
    trainer = Trainer(
        model=model,
        groups=layer_groups(model.net.body, model.head, stages=2),
        split=Split(train=_examples(0, 2), val=_examples(2, 1), ignored={}),
        class_names=CLASSES,
        prep=prep,
        preset=resolve_preset("auto", prep),
        dist=Dist(),
        precision="fp32",
        channels_last=True,
        settings=settings,
        identity=identity,
        out=out,
        log=log.append,
    )
    return trainer, model


def test_a_trainer_built_alone_trains_one_epoch_and_checkpoints_it(tmp_path):
    log: list[str] = []
    trainer, model = _trainer(tmp_path, SETTINGS, log, {"head": "a"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.fit()

    p = result.progress
    assert (p.epoch, p.step, len(p.history)) == (1, 3, 2)  # 6 photos, batch 2: 3 steps; epoch 0 + epoch 1
    assert all(math.isfinite(h["loss"]) for h in p.history) and p.history[1]["trainable_groups"] == 2
    assert not result.resumed and not result.stopped_early and p.train_images == 6
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    assert (tmp_path / BEST).is_file()
    assert checkpoint.load(tmp_path / LAST)["progress"]["step"] == 3
    assert log[0].startswith("epoch 0 (start, lp head): validation accuracy")
    assert any(m.startswith("epoch 1/1: validation accuracy") for m in log)

    # A fresh Trainer resumes from that checkpoint (nothing left to train), and only with the same identity.
    resume = dataclasses.replace(SETTINGS, resume=True)
    again = _trainer(tmp_path, resume, [], {"head": "a"})[0].fit()
    assert again.resumed and again.progress.step == 3 and again.progress.history == p.history
    with pytest.raises(InputError, match="head: 'a' then, 'b' now"):
        _trainer(tmp_path, resume, [], {"head": "b"})[0].fit()
