"""Stage: images + head directory -> fine-tuned network. ``finetune(cfg) -> FinetuneSummary``.

Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): the network starts as the backbone
plus the head ``fit-head`` fitted (refitted on the training photos only, see
:meth:`_Run._probe_on_train`), so the first gradient steps do not wreck the pretrained features
with a random head's large errors. Then, from the top down, one more group of backbone
layers is unfrozen every ``unfreeze_every`` epochs (gradual unfreezing, the seed article's FAQ 3),
each group training with a smaller learning rate than the one above it (``layers.py``). AdamW,
linear warm-up then cosine decay, optional label smoothing and class weights, gradient
accumulation, bf16 autocast and channels_last where they pay (``core/runtime.py``).

Early stopping and model selection use the validation photos ``fit-head`` held out
(``split.json``), by validation log-loss (the same criterion as the C sweep). Epoch 0 is the
starting model itself, so with LP-FT the result is never worse on validation than the probe.

``FT_DIR/`` holds ``model.pt`` (tensors-only state dict of the whole network, best epoch),
``finetune.json`` (what ``headstart export FT_DIR`` needs: backbone identity, preprocessing,
class names, head kind; plus metrics and history) and ``config.json``. While training,
``FT_DIR/checkpoint/`` holds ``last.pt`` (model, optimizer, scheduler, RNG, progress; every
``checkpoint_every`` optimizer steps and every epoch) and ``best.pt``; ``--resume`` continues
from ``last.pt`` after a crash or SIGKILL, mid-epoch included.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on its ``DistributedSampler`` share
inside ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPUs); validation is sharded and
summed across ranks, so every rank takes the same early-stopping decision; only rank 0 writes.

This module sets up (head, data, model, layer groups), hands them to a ``loop.Trainer`` and
writes FT_DIR from what it returns, through ``artifacts.finetune_dir`` (which also reads it for
``export``); the loop itself, checkpoints and resume are in ``loop.py`` and ``checkpoint.py``;
torchrun plumbing in ``core/distributed.py``. Progress messages go to a ``log`` callable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..artifacts.finetune_dir import read_finetune_meta, write_finetune_dir
from ..artifacts.head_dir import read_head
from ..config import FinetuneConfig, save_resolved
from ..core import runtime
from ..core.distributed import Dist, distributed
from ..data.augment import resolve_preset
from ..data.labels import LabelMap
from ..errors import InputError
from ..models.fingerprint import Fingerprint
from ..models.heads import Classifier, build_head
from . import checkpoint
from .data import Split, read_val_hashes, split_examples
from .layers import LayerGroups, layer_groups
from .loop import BEST, LAST, FitResult, Settings, Trainer, rate, run_identity


@dataclass
class FinetuneSummary:
    path: Path
    metrics: dict[str, Any]  # best epoch, validation
    start_metrics: dict[str, Any]  # epoch 0: the linear probe (init "lp") or the random head
    best_epoch: int
    epochs_run: int
    images_per_s: float
    n_train: int
    n_val: int
    is_main: bool = True
    resumed_from: str = ""

    def line(self) -> str:
        start = "linear probe" if self.start_metrics.get("init") == "lp" else "random head"
        return (
            f"{self.path}: validation accuracy {self.metrics['accuracy']:.3f}, log-loss {self.metrics['loss']:.3f} "
            f"on {self.n_val} photos (epoch 0, {start}: {self.start_metrics['accuracy']:.3f}); best epoch "
            f"{self.best_epoch} of {self.epochs_run}, {self.n_train} train photos, "
            f"{self.images_per_s:.1f} images/s{self.resumed_from}"
        )


# --------------------------------------------------------------------------- the stage


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] | None = None) -> FinetuneSummary:
    """``log`` receives the progress messages, rank 0's only and only with ``cfg.progress``.

    An injected callable rather than printing here, so a library caller (a notebook, a test)
    chooses where they go; the default writes them to stderr as ``finetune: ...``, which is what
    the CLI shows (its stdout holds only the summary line) without the CLI wiring anything."""
    _check(cfg)
    with distributed(cfg.device) as r:
        show = (log or _to_stderr) if r.is_main and cfg.progress else _quiet
        return _Run(cfg, r, show).run()


def _to_stderr(msg: str) -> None:
    print(f"finetune: {msg}", file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass


def _check(cfg: FinetuneConfig) -> None:
    problems = [
        (cfg.epochs < 1, f"--epochs must be at least 1, not {cfg.epochs}"),
        (cfg.accum_steps < 1, f"--accum-steps must be at least 1, not {cfg.accum_steps}"),
        (cfg.lr <= 0, f"--lr must be positive, not {cfg.lr}"),
        (not 0 < cfg.layer_decay <= 1, f"--layer-decay must be in (0, 1], not {cfg.layer_decay}"),
        (not 0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), not {cfg.label_smoothing}"),
        (not 0 <= cfg.warmup < 1, f"--warmup is a fraction of the steps in [0, 1), not {cfg.warmup}"),
        (cfg.init not in ("lp", "random"), f"--init must be lp or random, not {cfg.init!r}"),
        (cfg.class_weight not in (None, "balanced"), f"--class-weight must be balanced, not {cfg.class_weight!r}"),
        (cfg.stages < 1, f"--stages must be at least 1, not {cfg.stages}"),
        (cfg.unfreeze_every < 0, f"--unfreeze-every must be >= 0 epochs, not {cfg.unfreeze_every}"),
        (cfg.checkpoint_every < 1, f"--checkpoint-every must be at least 1 step, not {cfg.checkpoint_every}"),
    ]
    for bad, msg in problems:
        if bad:
            raise InputError(msg)


@dataclass(frozen=True)
class _Setup:
    """What the stage builds before training and needs again to write FT_DIR."""

    meta: dict[str, Any]  # head.json
    fp: Fingerprint
    preset: str
    class_names: list[str]
    split: Split
    precision: str
    batch: int  # per process
    head_kind: str
    model: Classifier
    groups: LayerGroups


class _Run:
    def __init__(self, cfg: FinetuneConfig, r: Dist, log: Callable[[str], None]) -> None:
        self.cfg, self.r, self.log = cfg, r, log
        self.out = Path(cfg.out)

    def run(self) -> FinetuneSummary:
        cfg, r = self.cfg, self.r
        meta, head_spec = read_head(Path(cfg.head))
        if cfg.resume and not (self.out / LAST).is_file() and (self.out / "finetune.json").is_file():
            return self._finished_summary()
        if not cfg.resume and (self.out / LAST).is_file():
            raise InputError(
                f"{self.out} holds the checkpoint of an unfinished fine-tune; pass --resume to continue it, "
                "or choose another --out"
            )
        s = self._setup(meta, head_spec)
        trainer = Trainer(
            model=s.model,
            groups=s.groups,
            split=s.split,
            class_names=s.class_names,
            prep=s.fp.preprocessing,
            preset=s.preset,
            dist=r,
            precision=s.precision,
            # Training always uses channels_last, like inference (runtime.CHANNELS_LAST): bf16
            # *training* on the 2-core AMX CPU ran 1.9x faster with it (Lite0, batch 16, fwd + bwd:
            # 2.5 vs 1.3 img/s under load); fp32 and CUDA gain from it too.
            channels_last=True,
            settings=Settings.from_config(cfg, s.batch),
            identity=run_identity(cfg, meta["files"].get("head.npz", "")),
            out=self.out,
            log=self.log,
        )
        result = trainer.fit()
        if r.is_main:
            self._write_outputs(s, result)
        if r.world > 1:
            dist.barrier()  # no rank returns before rank 0 has written FT_DIR
        return self._summary(s, result)

    # ----------------------------------------------------------------- setup

    def _setup(self, meta: dict[str, Any], head_spec: Any) -> _Setup:
        cfg, r = self.cfg, self.r
        head_dir = Path(cfg.head)
        fp = Fingerprint.from_record(meta["fingerprint"], source=str(head_dir / "head.json"))
        preset = resolve_preset(cfg.augment, fp.preprocessing)
        class_names: list[str] = list(meta["class_names"])

        split = None
        if r.is_main:  # hash once, share with the other ranks
            label_map = LabelMap.from_record(meta.get("label_map"))
            split = split_examples(cfg.images, class_names, read_val_hashes(head_dir), label_map)
        split = r.broadcast(split)
        precision = runtime.resolve_precision(cfg.precision, r.device)
        torch.manual_seed(cfg.seed)  # the random head (--init random) is the same on every rank
        model = self._build_model(meta, head_spec, fp, split, len(class_names))
        groups = layer_groups(model.net.body, model.head, cfg.stages)
        batch = cfg.batch_size or (64 if r.device.type == "cuda" else 32)
        return _Setup(meta, fp, preset, class_names, split, precision, batch, head_spec.kind, model, groups)

    def _build_model(
        self, meta: dict[str, Any], head_spec: Any, fp: Fingerprint, split: Split, n_classes: int
    ) -> Classifier:
        net = fp.load_backbone(self.cfg.weights_file, made=f"the head in {self.cfg.head}").net
        tensors = head_spec.torch_tensors()
        if self.cfg.init == "lp":
            tensors = self._probe_on_train(meta, head_spec.kind, split, n_classes) or tensors
        head = build_head(head_spec.kind, tensors)
        if self.cfg.init == "random":
            torch.manual_seed(self.cfg.seed)
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        return Classifier(net, head)

    def _probe_on_train(
        self, meta: dict[str, Any], kind: str, split: Split, n_classes: int
    ) -> dict[str, torch.Tensor] | None:
        """The linear probe refitted on the training photos only, with fit-head's C.

        ``head.npz`` is the final head, refitted on train + validation; starting from it would
        let the validation photos leak into the fine-tune, and epoch 0 (the probe) would look
        better on validation than it is. The cached features make the refit a matter of seconds.
        Falls back to ``head.npz`` (with a warning) when the cache is gone or the head is not
        logistic regression."""
        r = self.r
        cache_path = meta.get("cache")
        why = ""
        if meta.get("kind") != "logreg" or kind != "linear" or meta.get("C") is None:
            why = f"the head is {meta.get('kind')}, not logreg"
        elif not cache_path or not Path(cache_path).is_file():
            why = f"its feature cache {cache_path} is gone"
        tensors = None
        if not why and r.is_main:
            tensors = _refit_probe(Path(str(cache_path)), split.train, n_classes, meta, Path(self.cfg.head))
            if tensors is None:
                why = "the cache lacks some training photos or classes"
        tensors = r.broadcast(tensors)
        if tensors is None:
            self.log(f"starting from head.npz, which has seen the validation photos ({why or 'see above'})")
        return tensors

    # ----------------------------------------------------------------- outputs

    def _write_outputs(self, s: _Setup, result: FitResult) -> None:
        cfg, p = self.cfg, result.progress
        best = checkpoint.load(self.out / BEST)
        final = p.history[p.best_epoch]
        record = {
            "fingerprint": s.fp.to_record(),
            "metrics": final,
            "start_metrics": {**p.history[0], "init": cfg.init},
            "best_epoch": p.best_epoch,
            "epochs_run": p.epoch,
            "stopped_early": result.stopped_early,
            "history": [{k: v for k, v in h.items() if k != "per_class"} for h in p.history],
            "training": {
                "augment": s.preset,
                "device": str(self.r.device),
                "precision": s.precision,
                "world_size": self.r.world,
                "batch_size": s.batch,
                "accum_steps": cfg.accum_steps,
                "effective_batch": s.batch * cfg.accum_steps * self.r.world,
                "optimizer_steps": p.step,
                "images_per_s": rate(p),
                "layer_groups": s.groups.describe_short(),
            },
            "n_train": len(s.split.train),
            "n_val": len(s.split.val),
            "ignored": s.split.ignored,
            # The head's category tree, over the same classes: export puts it in the manifest and
            # predict rolls up with it, as for a model exported from the head itself.
            "tree": s.meta.get("tree"),
            "provenance": {
                "head_dir": str(Path(cfg.head).resolve()),
                "head_files": s.meta.get("files", {}),
                "cache": s.meta.get("cache"),
                "images": str(Path(cfg.images).resolve()),
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "headstart_version": __version__,
                "torch_version": torch.__version__,
            },
        }
        write_finetune_dir(
            self.out,
            best,
            dataclasses.replace(s.fp, precision=s.precision),
            s.class_names,
            {"kind": s.head_kind, "init": cfg.init, **_carried_head_keys(s.meta)},
            record,
        )
        save_resolved(cfg, self.out / "config.json", batch_size_used=s.batch, augment_used=s.preset)
        shutil.rmtree(self.out / "checkpoint", ignore_errors=True)  # done: model.pt is the best epoch

    def _summary(self, s: _Setup, result: FitResult) -> FinetuneSummary:
        p = result.progress
        return FinetuneSummary(
            path=self.out,
            metrics=p.history[p.best_epoch],
            start_metrics={**p.history[0], "init": self.cfg.init},
            best_epoch=p.best_epoch,
            epochs_run=p.epoch,
            images_per_s=rate(p),
            n_train=len(s.split.train),
            n_val=len(s.split.val),
            is_main=self.r.is_main,
            resumed_from=" (resumed)" if result.resumed else "",
        )

    def _finished_summary(self) -> FinetuneSummary:
        doc = read_finetune_meta(self.out)
        return FinetuneSummary(
            path=self.out,
            metrics=doc["metrics"],
            start_metrics=doc["start_metrics"],
            best_epoch=doc["best_epoch"],
            epochs_run=doc["epochs_run"],
            images_per_s=doc["training"]["images_per_s"],
            n_train=doc["n_train"],
            n_val=doc["n_val"],
            is_main=self.r.is_main,
            resumed_from=" (already finished)",
        )


def _carried_head_keys(meta: dict[str, Any]) -> dict[str, Any]:
    """What the fine-tuned model keeps of ``head.json``: the class ids, the label map (so
    evaluate maps folder names as the head did) and the recorded ``--unknown-threshold``, none
    of which training changes. Not the temperature: it calibrated the probe's logits and is not
    in the fine-tuned network."""
    return {k: meta.get(k) for k in ("class_ids", "label_map", "unknown_threshold")}


def _refit_probe(cache_path: Path, train: list[Any], n_classes: int, meta: dict[str, Any], head_dir: Path) -> Any:
    from ..cache.store import Cache
    from ..probe.estimators import LogisticHead

    class_weight = None
    with contextlib.suppress(OSError, ValueError):  # the class weighting fit-head used
        class_weight = json.loads((head_dir / "config.json").read_text(encoding="utf-8")).get("class_weight")

    label = {e.content_hash: e.label for e in train}
    with Cache(cache_path) as c:
        rows = [i for i, h in enumerate(c.content_hash) if h in label]
        if len(rows) < len(label) // 2:  # a different image set: do not pretend
            return None
        y = np.array([label[c.content_hash[i]] for i in rows])
        X = c.features(np.array(rows))
    if len(np.unique(y)) != n_classes:
        return None
    probe = LogisticHead(C=float(meta["C"]), class_weight=class_weight).fit(X, y)
    w, b = probe.linear_params()
    if w.shape[0] != n_classes:
        return None
    return {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}
