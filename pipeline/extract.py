"""Stage: images -> HDF5 feature cache. ``extract(cfg) -> path``.

Incremental and crash-safe (see ``cache/store.py`` for why a journal): every file is hashed,
rows already in the cache or in the journal are reused, only new content is decoded and run
through the backbone, and the cache is rewritten atomically at the end with labels and paths
refreshed from the folder. Identical files are decoded once; a renamed file reuses its row.

Two execution models share one body of work (``_extract_share``): a single process, or the
ranks of ``torchrun`` (``core/distributed.py``). The lead process - the only one, or rank 0 -
holds the writer lock and alone touches the cache file (``_lead``); the other ranks only add
their share to the journal (``_follow``). ``extract`` is the one place that picks between them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
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
from .data.loader import DECODERS, Source, embed_batches, make_loader
from .errors import CacheError, HeadstartError, InputError
from .models.backbones import LoadedBackbone, get_spec, load_backbone, with_preprocessing
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


@dataclass(frozen=True)
class _Run:
    """What every process resolves from the options before any of them touches the cache."""

    cfg: ExtractConfig
    out: Path
    dist: Dist
    device: torch.device
    precision: str
    catalog: Catalog
    loaded: LoadedBackbone
    fp: Fingerprint
    t0: float


@dataclass
class _Share:
    """What one process knows about the folder once its share of the work is done."""

    by_hash: dict[str, list[int]]  # content hash -> the catalog items with those bytes
    skipped: list[tuple[str, str]]  # (path, reason), found before any decoding
    known: dict[str, np.ndarray]  # hash -> feature row: from the cache, the journal or this process
    bad: dict[str, str]  # hash -> why its bytes give no row
    todo: list[str]  # new content, all ranks' together
    mine: list[str]  # the part of ``todo`` this process extracted


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract (or update) the cache ``cfg.out``. Under ``torchrun`` every rank runs this; the
    ranks split the new photos between them and rank 0 writes the cache (``distributed.py``)."""
    run = _start(cfg)
    if run.dist.is_main:
        return _lead(run, others=run.dist.world > 1)
    return _follow(run)


def _start(cfg: ExtractConfig) -> _Run:
    """Check the options, find the photos and load the backbone (every process)."""
    t0 = time.perf_counter()
    if cfg.dtype not in ("float16", "float32"):
        raise InputError(f"--dtype must be float16 or float32, not {cfg.dtype!r}")
    spec = with_preprocessing(get_spec(cfg.backbone), draft=cfg.draft, letterbox=cfg.letterbox)
    dist = distributed.from_env()
    device = dist.local_device(runtime.resolve_device(cfg.device))
    precision = runtime.resolve_precision(cfg.precision, device)
    if cfg.decode not in DECODERS:
        raise InputError(f"--decode must be cpu or gpu, not {cfg.decode!r}")
    if cfg.decode == "gpu":
        require_cuda(device)  # before hashing thousands of files, not after
    catalog = discover(cfg.images)
    loaded = load_backbone(spec, cfg.weights_file)
    return _Run(cfg, Path(cfg.out), dist, device, precision, catalog, loaded, loaded.fingerprint(precision), t0)


def _lead(run: _Run, others: bool) -> ExtractSummary:
    """The only process, or rank 0 of several (``others``): under the writer lock, prepare the
    journal, do its share, merge what the other ranks put in the journal, commit the cache."""
    cfg, out, dist = run.cfg, run.out, run.dist
    with writer_lock(out):
        journal = Journal(out)
        error: HeadstartError | None = None
        try:
            _prepare(cfg, out, journal, run.fp, fresh_journal=others)
        except HeadstartError as e:
            error = e
        dist.agree(error)
        old = _read_old(cfg, out, features=True)
        share = _extract_share(run, journal, old)
        if others:
            dist.barrier()  # every rank's rows are in the journal now
            rows, skips = journal.load()
            share.known.update({h: v for h, v in rows.items() if h in share.by_hash})
            share.bad.update({h: r for h, r in skips.items() if h in share.by_hash})
        contents = _assemble(run, share, old)
        write_cache(out, contents)
        journal.clear()

    resolved = out.with_name(out.name + ".config.json")
    save_resolved(cfg, resolved, resolved_precision=run.precision, device=str(run.device))
    summary = ExtractSummary(
        path=out,
        rows=len(contents.content_hash),
        extracted=len(share.todo),
        reused=len(share.by_hash) - len(share.todo),
        skipped=contents.skipped,
        seconds=time.perf_counter() - run.t0,
        class_names=contents.class_names,
    )
    if cfg.strict and summary.skipped:
        listed = "; ".join(f"{p}: {r}" for p, r in summary.skipped[:5])
        raise InputError(f"{len(summary.skipped)} file(s) skipped and --strict is set: {listed}")
    return summary


def _follow(run: _Run) -> ExtractSummary:
    """A torchrun rank other than 0: no lock and never the cache file. It appends its share to
    the journal rank 0 has prepared and waits until every rank has done the same."""
    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, progress=False))  # one set of bars, rank 0's
    dist, out = run.dist, run.out
    dist.agree(None)  # rank 0's _prepare: a refused cache stops every rank here
    share = _extract_share(run, Journal(out), _read_old(run.cfg, out, features=False))
    dist.barrier()  # rank 0 merges the journal only after this
    mine, todo = len(share.mine), len(share.todo)
    return ExtractSummary(
        path=out,
        rows=0,
        extracted=mine,
        reused=0,
        seconds=time.perf_counter() - run.t0,
        note=f"rank {dist.rank}/{dist.world}: extracted {mine} of {todo} new photos (its shard); rank 0 writes {out}",
    )


def _extract_share(run: _Run, journal: Journal, old: CacheContents | None) -> _Share:
    """The work every process does: hash its slice of the files (and learn the rest from the
    other ranks), find the content neither the cache nor the journal has, run the backbone on
    the part of it this process owns and append those rows to the journal."""
    catalog = run.catalog
    hashes = _hash_all(catalog, run.cfg.progress, run.dist)
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
        known.update((h, old.features[r]) for r, h in enumerate(old.content_hash) if h in wanted)
    journal_rows, journal_skips = journal.load() if journal.exists() else ({}, {})
    known.update({h: v for h, v in journal_rows.items() if h in by_hash})
    todo = sorted((h for h in by_hash if h not in known and h not in journal_skips), key=lambda h: by_hash[h][0])
    bad: dict[str, str] = {h: r for h, r in journal_skips.items() if h in by_hash}
    mine = [h for h in todo if run.dist.owns_hash(h)]  # all of it in one process

    if mine:
        journal.start(run.fp)
        sources = [catalog.items[by_hash[h][0]].path for h in mine]
        new_rows, new_bad = _run_backbone(run.cfg, run.loaded, run.device, run.precision, sources, mine, journal)
        known.update(new_rows)
        bad.update(new_bad)
    return _Share(by_hash, skipped, known, bad, todo, mine)


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
        bar = tqdm(pool.map(one, mine), total=len(mine), desc="hashing", unit="file", disable=not progress, leave=False)
        values = list(bar)
    return merge_shards(dist.gather(dict(zip(mine, values, strict=True))), len(catalog.items))


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


def _read_old(cfg: ExtractConfig, out: Path, features: bool) -> CacheContents | None:
    """The committed cache, if it is to be reused. Ranks other than 0 need only its keys: they
    get zero-width feature rows, which cost no memory."""
    if cfg.rebuild or not out.exists():
        return None
    with Cache(out) as c:
        if features:
            return c.read_all()
        hashes = c.content_hash
        return CacheContents(
            features=np.zeros((len(hashes), 0), np.float16),
            content_hash=hashes,
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
    loaded: LoadedBackbone,
    device: torch.device,
    precision: str,
    sources: Sequence[Source],
    keys: list[str],
    journal: Journal,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Features of ``sources`` (content hashes ``keys``), committed to the journal in batches:
    hash -> row for the photos that decode, hash -> reason for the others."""
    spec = loaded.spec
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    loader = make_loader(
        sources,
        spec.preprocessing,
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
        feats = np.concatenate(pend_f) if pend_f else np.zeros((0, spec.feature_dim), dtype)
        journal.append(pend_h, feats, [h for h, _ in pend_bad], [r for _, r in pend_bad])
        pend_h.clear()
        pend_f.clear()
        pend_bad.clear()
        last = time.monotonic()

    bar = tqdm(total=len(keys), desc=f"extract {spec.name}", unit="img", disable=not cfg.progress)
    try:
        for batch, feats in embed_batches(loaded.net, loader, device=device, precision=precision):
            idx = batch.index.tolist()
            ok = batch.ok.tolist()
            feats = feats.astype(dtype)
            k = 0
            for j, i in enumerate(idx):
                h = keys[i]
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


def _assemble(run: _Run, share: _Share, old: CacheContents | None) -> CacheContents:
    """Rows ordered by path, one per distinct content; labels and paths from this scan."""
    cfg, catalog, fp = run.cfg, run.catalog, run.fp
    class_names = catalog.class_names
    label_id = {n: i for i, n in enumerate(class_names)}
    feats: list[np.ndarray] = []
    hashes: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    duplicates: list[tuple[str, str]] = []
    skipped = list(share.skipped)
    for h, members in sorted(share.by_hash.items(), key=lambda kv: catalog.items[kv[1][0]].rel):
        first = catalog.items[members[0]]
        if h in share.bad:
            skipped.extend((catalog.items[i].rel, share.bad[h]) for i in members)
            continue
        item_labels = {lab for i in members if (lab := catalog.items[i].label) is not None}
        label = -1
        if len(item_labels) == 1:
            label = label_id[item_labels.pop()]
        elif len(item_labels) > 1:
            why = f"identical bytes filed under {len(item_labels)} labels ({', '.join(sorted(item_labels))})"
            skipped.append((first.rel, f"{why}; kept unlabelled"))
        feats.append(share.known[h])
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
