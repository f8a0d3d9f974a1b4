"""Stage: images -> HDF5 feature cache. ``extract(cfg) -> path``.

Incremental and crash-safe (see ``cache.py`` for why a journal): every file is hashed, rows
already in the cache or in the journal are reused, only new content is decoded and run through
the backbone, and the cache is rewritten atomically at the end with labels and paths refreshed
from the folder. Identical files are decoded once; a renamed file reuses its row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .cache.store import Cache, CacheContents, Journal, remove_stale_temporaries, write_cache, writer_lock
from .config import ExtractConfig, save_resolved
from .core import distributed, runtime
from .core.distributed import Dist, merge_shards
from .core.hashing import hash_file
from .data.gpu_decode import require_cuda
from .data.images import Catalog, discover
from .data.loader import DECODERS, embed_batches, make_loader
from .errors import CacheError, HeadstartError, InputError
from .models.backbones import get_spec, load_backbone, with_preprocessing
from .models.fingerprint import Fingerprint

# A journal batch is committed every this many rows or seconds, whichever comes first: a kill
# loses at most that much work, and batch files stay few. The environment overrides exist for
# the crash tests (small batches on a tiny catalog) and for tuning, not as user options.
COMMIT_EVERY_ROWS = int(os.environ.get("HEADSTART_COMMIT_ROWS", "1024"))
COMMIT_EVERY_SECONDS = float(os.environ.get("HEADSTART_COMMIT_SECONDS", "5"))


@dataclass
class ExtractSummary:
    path: Path
    rows: int
    extracted: int  # rows computed by this run
    reused: int  # rows taken from the cache or journal
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    class_names: list[str] = field(default_factory=list)
    note: str = ""  # replaces the line on torchrun ranks other than 0

    def line(self) -> str:
        if self.note:
            return self.note
        rate = f" ({self.extracted / self.seconds:.1f} images/s)" if self.extracted and self.seconds else ""
        return (
            f"{self.path}: {self.rows} rows, {len(self.class_names)} classes; "
            f"extracted {self.extracted}{rate}, reused {self.reused}, skipped {len(self.skipped)}"
        )


def _hash_all(catalog: Catalog, progress: bool, dist: Dist) -> list[str | OSError]:
    """The content hash of every file (or why it cannot be read). Under torchrun each rank
    hashes every N-th file and the ranks exchange their slices."""
    mine = [i for i in range(len(catalog.items)) if dist.owns_index(i)]

    def one(i: int) -> str | OSError:
        try:
            return hash_file(catalog.items[i].path)
        except OSError as e:
            return OSError(e.errno, e.strerror)  # plain, so it pickles across ranks

    # hashlib releases the GIL on large buffers, so threads overlap the reads.
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(
            tqdm(
                pool.map(one, mine),
                total=len(mine),
                desc="hashing",
                unit="file",
                disable=not progress,
                leave=False,
            )
        )
    if dist.world == 1:
        return values
    return merge_shards(dist.gather(dict(zip(mine, values, strict=True))), len(catalog.items))


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract (or update) the cache ``cfg.out``. Under ``torchrun`` every rank runs this; the
    ranks split the new photos between them and rank 0 writes the cache (``distributed.py``)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    if cfg.dtype not in ("float16", "float32"):
        raise InputError(f"--dtype must be float16 or float32, not {cfg.dtype!r}")
    spec = with_preprocessing(get_spec(cfg.backbone), draft=cfg.draft, letterbox=cfg.letterbox)
    dist = distributed.from_env()
    if not dist.is_main:
        cfg = dataclasses.replace(cfg, progress=False)  # one set of progress bars, rank 0's
    device = runtime.resolve_device(cfg.device)
    if dist.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)  # one GPU per local rank
    precision = runtime.resolve_precision(cfg.precision, device)
    if cfg.decode not in DECODERS:
        raise InputError(f"--decode must be cpu or gpu, not {cfg.decode!r}")
    if cfg.decode == "gpu":
        require_cuda(device)  # before hashing thousands of files, not after
    catalog = discover(cfg.images)
    loaded = load_backbone(spec, cfg.weights_file)
    fp = loaded.fingerprint(precision)

    # Only rank 0 takes the writer lock and touches the cache file; the other ranks only add
    # batches to the journal, after rank 0 has prepared it.
    with writer_lock(out) if dist.is_main else contextlib.nullcontext():
        journal = Journal(out)
        error: HeadstartError | None = None
        if dist.is_main:
            try:
                _prepare(cfg, out, journal, fp, fresh_journal=dist.world > 1)
            except HeadstartError as e:
                error = e
        dist.agree(error)
        old = None if cfg.rebuild or not out.exists() else _read_old(out, features=dist.is_main)

        hashes = _hash_all(catalog, cfg.progress, dist)
        skipped: list[tuple[str, str]] = [(s.rel, s.reason) for s in catalog.skipped]
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            if isinstance(h, Exception):
                skipped.append((catalog.items[i].rel, f"cannot read file: {h}"))
            else:
                by_hash[h].append(i)

        known: dict[str, np.ndarray] = {}
        if old is not None:
            wanted = set(by_hash)
            for r, h in enumerate(old.content_hash):
                if h in wanted:  # (ranks other than 0 only need to know which rows exist)
                    known[h] = old.features[r] if dist.is_main else _KEY_ONLY
        journal_rows, journal_skips = journal.load() if journal.exists() else ({}, {})
        known.update({h: v for h, v in journal_rows.items() if h in by_hash})
        todo = sorted((h for h in by_hash if h not in known and h not in journal_skips), key=lambda h: by_hash[h][0])
        bad: dict[str, str] = {h: r for h, r in journal_skips.items() if h in by_hash}
        mine = [h for h in todo if dist.owns_hash(h)] if dist.world > 1 else todo

        if mine:
            journal.start(fp)
            new_rows, new_bad = _run_backbone(cfg, loaded, spec, device, precision, catalog, by_hash, mine, journal)
            known.update(new_rows)
            bad.update(new_bad)
        if dist.world > 1:
            dist.barrier()  # every rank's rows are in the journal now
            if not dist.is_main:
                return ExtractSummary(
                    path=out,
                    rows=0,
                    extracted=len(mine),
                    reused=0,
                    seconds=time.perf_counter() - t0,
                    note=f"rank {dist.rank}/{dist.world}: extracted {len(mine)} of {len(todo)} new photos "
                    f"(its shard); rank 0 writes {out}",
                )
            rows, skips = journal.load()
            known.update({h: v for h, v in rows.items() if h in by_hash})
            bad.update({h: r for h, r in skips.items() if h in by_hash})

        contents = _assemble(cfg, catalog, by_hash, known, bad, skipped, fp, old)
        write_cache(out, contents)
        journal.clear()

    save_resolved(cfg, out.with_name(out.name + ".config.json"), resolved_precision=precision, device=str(device))
    summary = ExtractSummary(
        path=out,
        rows=len(contents.content_hash),
        extracted=len(todo),
        reused=len(by_hash) - len(todo),
        skipped=contents.skipped,
        seconds=time.perf_counter() - t0,
        class_names=contents.class_names,
    )
    if cfg.strict and summary.skipped:
        listed = "; ".join(f"{p}: {r}" for p, r in summary.skipped[:5])
        raise InputError(f"{len(summary.skipped)} file(s) skipped and --strict is set: {listed}")
    return summary


def _prepare(cfg: ExtractConfig, out: Path, journal: Journal, fp: Fingerprint, fresh_journal: bool) -> None:
    """Under the writer lock: clean up after killed writers, refuse a cache or drop a journal
    of another configuration, start over on --rebuild."""
    remove_stale_temporaries(out)
    if cfg.rebuild:
        journal.clear()
    else:
        if out.exists():
            with Cache(out) as c:
                _check_fingerprint(out, c.fingerprint, fp)
        jfp = journal.fingerprint()
        if jfp is not None and jfp.diff(fp):
            journal.clear()  # unfinished work of another configuration: useless here
    if fresh_journal:
        journal.start(fp)  # before the other ranks append to it


_KEY_ONLY = np.zeros(0, np.float16)


def _read_old(out: Path, features: bool) -> CacheContents:
    """The committed cache; ranks other than 0 need only its keys, not its features."""
    with Cache(out) as c:
        if features:
            return c.read_all()
        return CacheContents(
            features=_KEY_ONLY,
            content_hash=c.content_hash,
            paths=[],
            labels=np.zeros(0, np.int32),
            class_names=[],
            attrs={},
        )


def _check_fingerprint(out: Path, have: Fingerprint, want: Fingerprint) -> None:
    diff = have.diff(want)
    if diff:
        raise CacheError(
            f"{out} was extracted with {have.describe()} but this run uses {want.describe()} "
            f"({'; '.join(diff)}); re-run with --backbone {have.backbone} and the same options, "
            f"or pass --rebuild to start the cache over, or choose another --out"
        )


def _run_backbone(
    cfg: ExtractConfig,
    loaded: object,
    spec: object,
    device: torch.device,
    precision: str,
    catalog: Catalog,
    by_hash: dict[str, list[int]],
    todo: list[str],
    journal: Journal,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    sources = [catalog.items[by_hash[h][0]].path for h in todo]
    loader = make_loader(
        sources,
        spec.preprocessing,  # type: ignore[attr-defined]
        device=device,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        max_pixels=cfg.max_pixels,
        decode=cfg.decode,
    )
    rows: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    pend_h: list[str] = []
    pend_f: list[np.ndarray] = []
    pend_bad: list[tuple[str, str]] = []
    last = time.monotonic()

    def commit() -> None:
        nonlocal last
        feats = np.concatenate(pend_f) if pend_f else np.zeros((0, spec.feature_dim), dtype)  # type: ignore[attr-defined]
        journal.append(pend_h, feats, [h for h, _ in pend_bad], [r for _, r in pend_bad])
        pend_h.clear()
        pend_f.clear()
        pend_bad.clear()
        last = time.monotonic()

    bar = tqdm(total=len(todo), desc=f"extract {spec.name}", unit="img", disable=not cfg.progress)  # type: ignore[attr-defined]
    try:
        for batch, feats in embed_batches(loaded.net, loader, device=device, precision=precision):  # type: ignore[attr-defined]
            idx = batch.index.tolist()
            ok = batch.ok.tolist()
            feats = feats.astype(dtype)
            k = 0
            for j, i in enumerate(idx):
                h = todo[i]
                if ok[j]:
                    rows[h] = feats[k]
                    pend_h.append(h)
                    k += 1
                else:
                    bad[h] = batch.errors[j]
                    pend_bad.append((h, batch.errors[j]))
            if k:
                pend_f.append(feats)
            bar.update(len(idx))
            if len(pend_h) >= COMMIT_EVERY_ROWS or time.monotonic() - last > COMMIT_EVERY_SECONDS:
                commit()
        if pend_h or pend_bad:
            commit()
    finally:
        bar.close()
    return rows, bad


def _assemble(
    cfg: ExtractConfig,
    catalog: Catalog,
    by_hash: dict[str, list[int]],
    known: dict[str, np.ndarray],
    bad: dict[str, str],
    skipped: list[tuple[str, str]],
    fp: Fingerprint,
    old: CacheContents | None,
) -> CacheContents:
    """Rows ordered by path, one per distinct content; labels and paths from this scan."""
    class_names = catalog.class_names
    label_id = {n: i for i, n in enumerate(class_names)}
    feats: list[np.ndarray] = []
    hashes: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    duplicates: list[tuple[str, str]] = []
    skipped = list(skipped)
    for h, members in sorted(by_hash.items(), key=lambda kv: catalog.items[kv[1][0]].rel):
        first = catalog.items[members[0]]
        if h in bad:
            skipped.extend((catalog.items[i].rel, bad[h]) for i in members)
            continue
        item_labels = {lab for i in members if (lab := catalog.items[i].label) is not None}
        label = -1
        if len(item_labels) == 1:
            label = label_id[item_labels.pop()]
        elif len(item_labels) > 1:
            skipped.append(
                (
                    first.rel,
                    f"identical bytes filed under {len(item_labels)} labels "
                    f"({', '.join(sorted(item_labels))}); kept unlabelled",
                )
            )
        feats.append(known[h])
        hashes.append(h)
        paths.append(first.rel)
        labels.append(label)
        duplicates.extend((catalog.items[i].rel, h) for i in members[1:])
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    attrs: dict[str, object] = dict(fp.to_record())
    attrs.update(
        created=(old.attrs.get("created", now) if old else now),
        updated=now,
        image_root=str(catalog.root),
        layout=catalog.layout,
        headstart_version=__version__,
        torch_version=torch.__version__,
        config=json.dumps({k: v for k, v in vars(cfg).items()}, default=str, ensure_ascii=False),
    )
    d = fp.feature_dim
    matrix = np.stack(feats).astype(dtype) if feats else np.zeros((0, d), dtype)
    return CacheContents(
        features=matrix,
        content_hash=hashes,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int32),
        class_names=class_names,
        attrs=attrs,
        duplicates=duplicates,
        skipped=sorted(skipped),
    )
