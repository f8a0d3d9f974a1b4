"""The fine-tuning loop: unfreezing phases, DDP, checkpoints, resume, validation.

:class:`Trainer` is given everything it trains with (model, layer groups, photos,
preprocessing, device and process group, hyper-parameters, output folder, a log callback) and
hands back a :class:`FitResult`; it never reads the stage's state, so it can be built and run
alone. ``stage.py`` does the setup (head, data, model) and writes FT_DIR from the result.

Resumability rests on three choices: checkpoints are taken only at optimizer-step boundaries
(no half-accumulated gradients to save); the data order of an epoch is a pure function of
(seed, epoch) and augmentation of (seed, epoch, photo), so skipping the micro-batches already
done reproduces the rest of the epoch; and the global RNG (dropout, stochastic depth) is saved
per rank, while the DataLoader draws from its own generator.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import FinetuneConfig, to_dict
from ..core import runtime
from ..core.distributed import Dist
from ..data.loader import make_loader
from ..data.preprocessing import Preprocessing
from ..errors import InputError
from ..models.heads import Classifier
from ..probe.metrics import classification_metrics
from . import checkpoint
from .data import ResumeSampler, Split, TrainSet, collate, per_rank_samples
from .layers import LayerGroups

LAST, BEST = "checkpoint/last.pt", "checkpoint/best.pt"
# Settings a resumed run must share with the run it continues: they fix the data order, the
# schedule and the model. Anything else (workers, device, progress) may change.
RESUME_KEYS = (
    "head", "epochs", "batch_size", "accum_steps", "lr", "layer_decay", "stages", "unfreeze_every", "warmup",
    "weight_decay", "label_smoothing", "class_weight", "augment", "init", "seed", "precision",
)  # fmt: skip


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based; epoch e's validation is history entry e+1)
    micro: int = 0  # micro-batches of this epoch already trained on (at an optimizer-step boundary)
    step: int = 0  # optimizer steps so far
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    train_images: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """The ``FinetuneConfig`` values the loop reads, with the batch size resolved. No defaults:
    a second copy of the CLI's defaults here would drift from ``config.py``."""

    epochs: int
    batch: int  # per process
    accum_steps: int
    lr: float
    layer_decay: float
    weight_decay: float
    warmup: float
    label_smoothing: float
    class_weight: str | None
    init: str  # "lp": the head starts fitted, so the top backbone group trains from step 0
    unfreeze_every: float
    patience: int
    clip_grad: float | None
    checkpoint_every: int
    seed: int
    workers: int | None
    max_pixels: int | None
    resume: bool

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, batch: int) -> Settings:
        names = [f.name for f in fields(cls) if f.name != "batch"]
        return cls(batch=batch, **{n: getattr(cfg, n) for n in names})


def run_identity(cfg: FinetuneConfig, head_id: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the :data:`RESUME_KEYS` settings, with the
    head's identity (the sha256 of its head.npz) in place of its path, which may move."""
    d = {k: v for k, v in to_dict(cfg).items() if k in RESUME_KEYS}
    d["head"] = head_id
    return d


@dataclass
class FitResult:
    progress: Progress
    stopped_early: bool
    resumed: bool  # continued from FT_DIR/checkpoint/last.pt


class Trainer:
    """Trains ``model`` on ``split`` and keeps ``out/checkpoint/`` (``last.pt``, ``best.pt``).

    The constructor places the model on ``dist.device`` and builds optimizer, schedule and loss;
    :meth:`fit` runs to the end (or early stop), resuming from ``last.pt`` if
    ``settings.resume``. Only rank 0 writes files; messages reach ``log`` from any rank, and
    the caller decides which ranks' to show."""

    def __init__(
        self,
        *,
        model: Classifier,
        groups: LayerGroups,
        split: Split,
        class_names: list[str],
        prep: Preprocessing,
        preset: str,
        dist: Dist,
        precision: str,
        channels_last: bool,
        settings: Settings,
        identity: dict[str, Any],
        out: Path,
        log: Callable[[str], None],
    ) -> None:
        self.model, self.groups = model, groups
        self.split, self.class_names = split, class_names
        self.prep, self.preset = prep, preset
        self.r, self.precision, self.channels_last = dist, precision, channels_last
        self.s, self.batch, self.identity = settings, settings.batch, identity
        self.out, self.log = out, log
        model.to(dist.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        s = settings
        n_rank = per_rank_samples(len(split.train), dist.world)
        self.micro_per_epoch = math.ceil(n_rank / self.batch)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / s.accum_steps)
        self.total_steps = s.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(groups.param_groups(s.lr, s.layer_decay, s.weight_decay))
        warm = int(s.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_cosine(warm, self.total_steps))
        self.criterion = nn.CrossEntropyLoss(weight=self._class_weights(), label_smoothing=s.label_smoothing)
        self.unfrozen = 0  # backbone groups training now; set by _set_phase

    def _class_weights(self) -> torch.Tensor | None:
        if self.s.class_weight != "balanced":
            return None
        counts = np.bincount([e.label for e in self.split.train], minlength=len(self.class_names)).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
        return torch.tensor(w, dtype=torch.float32, device=self.r.device)

    # ----------------------------------------------------------------- unfreezing and DDP

    def _n_unfrozen(self, step: int) -> int:
        """Backbone groups training after ``step`` optimizer steps. LP-FT starts with the top
        group (the head was already fitted); a random head first trains alone."""
        first = 1 if self.s.init == "lp" else 0
        if self.s.unfreeze_every == 0:
            return self.groups.n_backbone
        every = self.s.unfreeze_every * self.steps_per_epoch
        return min(self.groups.n_backbone, first + int(step // every))

    def _set_phase(self, step: int) -> nn.Module:
        """Train mode for what trains, eval mode (frozen BatchNorm statistics) for the rest, and
        a fresh DDP wrapper: DDP fixes its set of gradient buckets when it is built."""
        self.model.train()
        self.unfrozen = self._n_unfrozen(step)
        self.groups.set_trainable(self.unfrozen)
        if self.r.world == 1:
            return self.model
        ids = [self.r.device.index] if self.r.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    # ----------------------------------------------------------------- checkpoints

    def _essentials(self) -> dict[str, Any]:
        return {**self.identity, "world_size": self.r.world, "n_train": len(self.split.train)}

    def _save_last(self, p: Progress) -> None:
        rngs = self.r.gather(checkpoint.rng_state())  # every rank's own stream
        if not self.r.is_main:
            return
        state = {
            "format": "headstart-finetune-checkpoint",
            "essentials": self._essentials(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "progress": asdict(p),
        }
        checkpoint.atomic_save(state, self.out / LAST)
        self.log(f"checkpoint: epoch {p.epoch + 1}, micro-batch {p.micro}/{self.micro_per_epoch}, step {p.step}")

    def _resume(self) -> Progress | None:
        path = self.out / LAST
        if not (self.s.resume and path.is_file()):
            return None
        state = checkpoint.load(path)
        want, have = self._essentials(), state.get("essentials", {})
        diff = [f"{k}: {have.get(k)!r} then, {v!r} now" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise InputError(
                f"cannot resume {self.out}: settings differ from the interrupted run ({'; '.join(diff)}); "
                "resume with the same settings, or start over with another --out"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[self.r.rank] if self.r.rank < len(rngs) else rngs[0])
        p = Progress(**state["progress"])
        self.log(f"resuming from epoch {p.epoch + 1}, micro-batch {p.micro}, step {p.step}")
        return p

    # ----------------------------------------------------------------- training

    def fit(self) -> FitResult:
        """Train to the end (or early stop)."""
        s, r = self.s, self.r
        if r.is_main:
            checkpoint.remove_tmp_files(self.out / "checkpoint")
        p = self._resume()
        resumed = p is not None
        if p is None:
            torch.manual_seed(s.seed * 1009 + r.rank)  # dropout / stochastic depth streams
            p = Progress()
            p.history.append({**self._validate(0), "trainable_groups": 0})
            p.best_loss = p.history[0]["loss"]
            self._save_best(p)
            self.log(f"epoch 0 (start, {s.init} head): {_fmt(p.history[0])}")
        dataset = TrainSet(self.split.train, self.prep, self.preset, s.seed, s.max_pixels)
        workers = runtime.auto_workers(r.device) if s.workers is None else s.workers
        runtime.prepare_worker_sharing(workers)
        stopped_early = False
        while p.epoch < s.epochs and not stopped_early:
            dataset.epoch = p.epoch
            sampler = ResumeSampler(
                len(dataset), seed=s.seed, epoch=p.epoch, rank=r.rank, world=r.world, skip=p.micro * self.batch
            )
            loader = DataLoader(
                dataset,
                batch_size=self.batch,
                sampler=sampler,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=r.device.type == "cuda",
                prefetch_factor=4 if workers else None,
                generator=torch.Generator(),  # leave the global RNG to the model (resumable)
            )
            self._train_epoch(loader, p)
            p.history.append({**self._validate(p.epoch + 1), "trainable_groups": self.unfrozen})
            stopped_early = self._end_epoch(p)
        return FitResult(p, stopped_early, resumed)

    def _train_epoch(self, loader: DataLoader[Any], p: Progress) -> None:
        s, r = self.s, self.r
        ddp = self._set_phase(p.step)
        t_epoch = time.perf_counter()
        seen, errors = 0, 0
        for x, y, errs in loader:
            errors += len(errs)
            m = p.micro
            window = min(s.accum_steps, self.micro_per_epoch - (m // s.accum_steps) * s.accum_steps)
            last_in_window = (m + 1) % s.accum_steps == 0 or m + 1 == self.micro_per_epoch
            sync = contextlib.nullcontext() if last_in_window or r.world == 1 else ddp.no_sync()  # type: ignore[operator]
            with sync:
                loss = self._loss(ddp, x, y) / window
                loss.backward()
            p.micro += 1
            seen += len(y)
            if not last_in_window:
                continue
            if s.clip_grad:
                nn.utils.clip_grad_norm_([q for q in self.model.parameters() if q.requires_grad], s.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            p.step += 1
            if self._n_unfrozen(p.step) != self.unfrozen:
                ddp = self._set_phase(p.step)
                self.log(f"step {p.step}: {self.unfrozen} of {self.groups.n_backbone} backbone groups training")
            if p.step % s.checkpoint_every == 0 and p.micro < self.micro_per_epoch:
                self._account(p, seen, t_epoch)
                seen, t_epoch = 0, time.perf_counter()
                self._save_last(p)
        self._account(p, seen, t_epoch)
        if errors:
            self.log(f"epoch {p.epoch + 1}: {errors} training photos could not be decoded and were left out")

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(y) == 0:  # every photo of the batch undecodable: a zero loss keeps DDP in step
            zero = torch.zeros((), device=self.r.device)
            return sum((q.sum() * 0.0 for q in self.model.parameters() if q.requires_grad), zero)
        x = x.to(self.r.device, non_blocking=True)
        y = y.to(self.r.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(self.r.device, self.precision):
            logits = model(x)
        return self.criterion(logits.float(), y)  # type: ignore[no-any-return]

    def _account(self, p: Progress, seen: int, since: float) -> None:
        p.train_images += seen * self.r.world
        p.train_seconds += time.perf_counter() - since

    def _end_epoch(self, p: Progress) -> bool:
        h = p.history[-1]
        improved = h["loss"] < p.best_loss - 1e-6
        if improved:
            p.best_loss, p.best_epoch, p.bad_epochs = h["loss"], p.epoch + 1, 0
            self._save_best(p)
        else:
            p.bad_epochs += 1
        self.log(f"epoch {p.epoch + 1}/{self.s.epochs}: {_fmt(h)}{' (best)' if improved else ''}")
        p.epoch += 1
        p.micro = 0
        stop = self.s.patience > 0 and p.bad_epochs >= self.s.patience
        if stop:
            self.log(f"early stop: no better validation log-loss for {p.bad_epochs} epochs")
        self._save_last(p)
        return stop

    def _save_best(self, p: Progress) -> None:
        if self.r.is_main:
            checkpoint.atomic_save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, self.out / BEST)

    @torch.inference_mode()
    def _validate(self, epoch: int) -> dict[str, Any]:
        """Validation log-loss and accuracy over all ranks (each scores every world-th photo)."""
        r = self.r
        mine = list(range(r.rank, len(self.split.val), r.world))
        self.model.eval()
        loader = make_loader(
            [self.split.val[i].path for i in mine],
            self.prep,
            device=r.device,
            batch_size=self.batch,
            workers=self.s.workers,
            max_pixels=self.s.max_pixels,
        )
        preds: dict[int, tuple[int, float]] = {}
        for batch in loader:
            if batch.pixels.numel() == 0:
                continue
            x = batch.pixels.to(r.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast(r.device, self.precision):
                logits = self.model(x).float()
            pos = batch.index[batch.ok].tolist()
            y = torch.tensor([self.split.val[mine[i]].label for i in pos], device=r.device)
            losses = nn.functional.cross_entropy(logits, y, reduction="none")
            for i, pred, loss in zip(pos, logits.argmax(1).tolist(), losses.tolist(), strict=True):
                preds[mine[i]] = (pred, loss)
        for part in r.gather(preds):
            preds.update(part)
        order = sorted(preds)
        y_true = np.array([self.split.val[i].label for i in order])
        y_pred = np.array([preds[i][0] for i in order])
        m = classification_metrics(y_true, y_pred, self.class_names)
        m.update(epoch=epoch, loss=float(np.mean([preds[i][1] for i in order])), split="validation")
        return m


def _warmup_cosine(warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def rate(p: Progress) -> float:
    return p.train_images / p.train_seconds if p.train_seconds > 0 else 0.0


def _fmt(m: dict[str, Any]) -> str:
    return f"validation accuracy {m['accuracy']:.3f}, log-loss {m['loss']:.3f}"
