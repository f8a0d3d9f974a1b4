"""Stage: images -> HDF5 feature cache. ``extract(cfg) -> path``.

Incremental, crash-safe and bounded in memory (see ``cache/store.py`` for the layout): every
file is stat-ed, and hashed only if its (size, mtime, inode, device) differs from what the
index remembers (``--rehash``: every file); rows already in the cache or in finished segments
of a killed run are reused; only new content is decoded and run through the backbone, and its
rows go to new segment files as they come (``SEGMENT_ROWS`` at a time). The commit writes a new
index with labels and paths refreshed from the folder; no old feature byte is rewritten.
Identical files are decoded once; a renamed file reuses its row.

Two execution models share one body of work (``_extract_share``): a single process, or the
ranks of ``torchrun`` (``core/distributed.py``). The lead process - the only one, or rank 0 -
holds the writer lock and alone writes the index (``_lead``); every rank writes its own
segments straight into the cache's folder, so no feature byte passes through rank 0
(``_follow``). ``extract`` is the one place that picks between them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import PIL
import torch
from tqdm.auto import tqdm

from . import __version__
from .cache import compact, statcache
from .cache.h5io import SCHEMA_VERSION
from .cache.index import IndexContents, commit
from .cache.previous import PreviousIndex, prepare, read_previous
from .cache.scan import INDEX_RULES, INPUTS_ATTR, Scan, index_contents, inputs_digest, label_changes
from .cache.segments import (
    SegmentInfo,
    SegmentWriter,
    adopt,
    configured_segment_rows,
    unindexed_segments,
)
from .cache.store import Cache, writer_lock
from .config import ExtractConfig, save_resolved
from .core import distributed, runtime
from .core.distributed import Dist
from .data.catalog import Catalog, discover
from .data.gpu_decode import require_cuda
from .data.images import DEFAULT_MAX_PIXELS
from .data.loader import DECODERS, Source, embed_batches, make_loader
from .errors import BackboneError, HeadstartError, InputError, WorkerError
from .models import engine as engines
from .models.backbones import (
    BackboneSpec,
    LoadedBackbone,
    get_spec,
    load_backbone,
    sized_name,
    spec_fingerprint,
    with_preprocessing,
)
from .models.fingerprint import Fingerprint

# A segment is written every this many new rows or seconds, whichever comes first: a kill
# loses at most that much work, memory holds at most one segment's rows, and segment files stay
# few (the index maps each of them). The environment overrides exist for the crash tests (small
# segments on a tiny catalog) and for tuning, not as user options.
SEGMENT_ROWS = configured_segment_rows()
COMMIT_EVERY_SECONDS = float(os.environ.get("HEADSTART_COMMIT_SECONDS", "60"))


@dataclass
class ExtractSummary:
    path: Path
    rows: int
    extracted: int  # rows computed by this run
    reused: int  # rows taken from the cache or from finished segments of a killed run
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    class_names: list[str] = field(default_factory=list)
    note: str = ""  # replaces the line on torchrun ranks other than 0
    known_bad: int = 0  # skipped contents known from an earlier run (same limits): not decoded again
    removed: int = 0  # rows of the previous index whose photo is gone
    relabelled: int = 0  # rows whose label changed since the previous index
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # damaged segment files renamed, and why

    def line(self) -> str:
        if self.note:
            return self.note
        rate = f" ({self.extracted / self.seconds:.1f} images/s)" if self.extracted and self.seconds else ""
        known = f" ({self.known_bad} known from earlier runs, not decoded again)" if self.known_bad else ""
        changes = "".join(
            f", {what} {n}" for what, n in (("removed", self.removed), ("relabelled", self.relabelled)) if n
        )
        return (
            f"{self.path}: {self.rows} rows, {len(self.class_names)} classes; "
            f"extracted {self.extracted}{rate}, reused {self.reused}{changes}, skipped {len(self.skipped)}{known}"
        )


@dataclass(frozen=True)
class _Run:
    """What every process resolves from the options before any of them touches the cache."""

    cfg: ExtractConfig
    out: Path
    dist: Dist
    device: torch.device
    engine: str  # how the backbone runs (models.engine); not part of the fingerprint
    precision: str
    catalog: Catalog
    spec: BackboneSpec  # the network is built only when there are new photos (_extract_share)
    fp: Fingerprint
    limits: str  # what decides whether a file decodes (see decode_limits)
    t0: float


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract (or update) the cache ``cfg.out``. Under ``torchrun`` every rank runs this; the
    ranks split the new photos between them and rank 0 writes the cache (``distributed.py``)."""
    run = _start(cfg)
    if run.dist.is_main:
        return _lead(run, others=run.dist.world > 1)
    return _follow(run)


def _start(cfg: ExtractConfig) -> _Run:
    """Check the options, find the photos and the backbone's fingerprint (every process)."""
    t0 = time.perf_counter()
    if cfg.dtype not in ("float16", "float32"):
        raise InputError(f"--dtype must be float16 or float32, not {cfg.dtype!r}")
    backbone = sized_name(cfg.backbone, cfg.image_size)
    spec = with_preprocessing(get_spec(backbone), draft=cfg.draft, letterbox=cfg.letterbox)
    dist = distributed.from_env()
    device = dist.local_device(runtime.resolve_device(cfg.device))
    engine, precision = engines.resolve(cfg.engine, _precision_asked(cfg), device)
    if cfg.decode not in DECODERS:
        raise InputError(f"--decode must be cpu or gpu, not {cfg.decode!r}")
    if cfg.decode == "gpu":
        require_cuda(device)  # before hashing thousands of files, not after
    with runtime.no_cyclic_gc():
        catalog = discover(cfg.images)
    fp = spec_fingerprint(spec, cfg.weights_file, precision)
    return _Run(cfg, Path(cfg.out), dist, device, engine, precision, catalog, spec, fp, decode_limits(cfg), t0)


def decode_limits(cfg: ExtractConfig) -> str:
    """The settings, besides the bytes, that decide whether a file decodes: a remembered skip
    is reused only under the same ones (raise --max-pixels, or upgrade Pillow, and the file is
    tried again)."""
    return json.dumps({"max_pixels": cfg.max_pixels or DEFAULT_MAX_PIXELS, "pillow": PIL.__version__}, sort_keys=True)


def _precision_asked(cfg: ExtractConfig) -> str:
    """``--precision auto`` on a cache that exists: the precision it was made in, so growing it
    keeps its features comparable (a cache made in bf16 stays bf16 though fp32 is now the CPU
    default); otherwise what the user asked for."""
    if cfg.precision != "auto" or cfg.rebuild or not Path(cfg.out).is_file():
        return cfg.precision
    try:
        with Cache(Path(cfg.out)) as c:
            return c.fingerprint.precision
    except HeadstartError:
        return cfg.precision  # a damaged cache: prepare() says what is wrong with it


def _lead(run: _Run, others: bool) -> ExtractSummary:
    """The only process, or rank 0 of several (``others``): under the writer lock, clean up and
    convert an old cache, do its share, adopt the segments the other ranks wrote, commit."""
    cfg, out, dist = run.cfg, run.out, run.dist
    with writer_lock(out):
        error: HeadstartError | None = None
        set_aside: list[tuple[str, str]] = []
        old: PreviousIndex | None = None
        try:
            with runtime.no_cyclic_gc():
                set_aside, old = prepare(out, run.fp, rebuild=cfg.rebuild)
        except HeadstartError as e:
            error = e
        dist.agree(error)
        share = _extract_share(run, old)
        if others:
            dist.barrier()  # every rank's segments are in place now
            _take(run, share, old)
        if share.unchanged and old is not None:
            # The index is what this run would write again (scan.inputs_digest): keep it as it
            # is. Segments set aside as damaged were never in it, so they change nothing here.
            rows, skipped, class_names, extracted, removed, relabelled = (
                old.n_rows, old.skipped, old.class_names, 0, 0, 0,
            )  # fmt: skip
        else:
            with runtime.no_cyclic_gc():
                contents = _assemble(run, share, old)
                commit(out, contents)
                # Over 25 % dead rows: reclaim them (compact.py); the figures come from the
                # index just committed, without opening it again.
                compact.compact_if_needed(out, lock_held=True, index=contents)
                extracted = share.computed(share.todo)
                removed, relabelled = label_changes(old.label_columns if old else None, contents)
            rows, skipped, class_names = len(contents.content_hash), contents.skipped, contents.class_names

    resolved = out.with_name(out.name + ".config.json")
    save_resolved(cfg, resolved, resolved_precision=run.precision, engine=run.engine, device=str(run.device))
    summary = ExtractSummary(
        path=out,
        rows=rows,
        extracted=extracted,
        reused=rows - extracted,
        skipped=skipped,
        seconds=time.perf_counter() - run.t0,
        class_names=class_names,
        known_bad=share.known_bad,
        removed=removed,
        relabelled=relabelled,
        set_aside=set_aside,
    )
    if cfg.strict and summary.skipped:
        listed = "; ".join(f"{p}: {r}" for p, r in summary.skipped[:5])
        raise InputError(f"{len(summary.skipped)} file(s) skipped and --strict is set: {listed}")
    return summary


def _follow(run: _Run) -> ExtractSummary:
    """A torchrun rank other than 0: no lock and never the index. It writes its share as
    segments in the cache's folder and waits until every rank has done the same."""
    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, progress=False))  # one set of bars, rank 0's
    dist, out = run.dist, run.out
    dist.agree(None)  # rank 0's prepare(): a refused cache stops every rank here
    with runtime.no_cyclic_gc():
        old = read_previous(out, rebuild=run.cfg.rebuild)
    share = _extract_share(run, old)
    dist.barrier()  # rank 0 writes the index only after this
    mine, todo = share.computed(share.mine), len(share.todo)
    return ExtractSummary(
        path=out,
        rows=0,
        extracted=mine,
        reused=0,
        seconds=time.perf_counter() - run.t0,
        note=f"rank {dist.rank}/{dist.world}: extracted {mine} of {todo} new photos (its shard); rank 0 writes {out}",
    )


def _cache_dtype(cfg: ExtractConfig, old: PreviousIndex | None) -> str:
    """A cache keeps the dtype it was created with (its segments must agree)."""
    return old.dtype if old is not None else cfg.dtype


def _scan(run: _Run, old: PreviousIndex | None) -> Scan:
    """Stat (hash where needed) this process's slice of the files, learn the rest from the
    other ranks, reuse rows the index or finished segments hold, and list the new content."""
    catalog = run.catalog
    share = Scan([(s.rel, s.reason) for s in catalog.skipped])
    orphans = [] if run.cfg.rebuild else unindexed_segments(run.out, set(old.segment_rows) if old else set())
    share.scan_ns = time.time_ns()
    items, dist = catalog.items, run.dist
    if dist.world == 1:  # C-level column reads: no Python step per file
        mine: Sequence[int] = range(len(items))
        files, rels = list(map(attrgetter("file"), items)), list(map(attrgetter("rel"), items))
    else:
        mine = [i for i in range(len(items)) if dist.owns_index(i)]
        files, rels = [items[i].file for i in mine], [items[i].rel for i in mine]
    remembered = old.stat if old else statcache.Remembered()
    part = statcache.hash_files(files, rels, remembered, rehash=run.cfg.rehash, progress=run.cfg.progress)
    share.checked = checked = statcache.merge(dist.gather((mine, part)), len(items))  # and the other ranks' slices
    context = [run.fp.to_record(), run.limits, _cache_dtype(run.cfg, old), __version__, SCHEMA_VERSION, INDEX_RULES]
    share.inputs = inputs_digest(catalog, checked, context)
    if old is not None and not orphans and old.inputs == share.inputs and len(old.stat) == len(items):
        share.unchanged, share.known_bad = True, len(old.rejected)
        return share
    by_hash = share.by_hash
    for i, h in enumerate(checked.values):
        if type(h) is str:  # the common case first: one type check per file, not isinstance
            by_hash[h].append(i)
        else:
            share.skipped.append((items[i].rel, statcache.unreadable(h)))
    if old is not None:
        share.location.update(old.locations_of(by_hash.keys()))
    _take(run, share, old, orphans)
    if old is not None and old.rejected:  # broken content the index remembers: not decoded again under the same limits
        for h in old.rejected.keys() & by_hash.keys():
            known = old.rejected.get(h)
            if known and known[1] == run.limits and h not in share.location and h not in share.bad:
                share.bad[h] = known[0]
                share.known_bad += 1
    todo = by_hash.keys() - share.location.keys() - share.bad.keys()
    share.todo = sorted(todo, key=lambda h: by_hash[h][0])
    share.mine = [h for h in share.todo if run.dist.owns_hash(h)]  # all of it in one process
    return share


def _extract_share(run: _Run, old: PreviousIndex | None) -> Scan:
    """The work every process does: adopt finished segments a killed run left, stat (hash where
    needed) its slice of the files and learn the rest from the other ranks, run the backbone on
    the new content this process owns and write those rows as segments."""
    with runtime.no_cyclic_gc():  # the scan; the backbone below runs with the collector on
        share = _scan(run, old)
    if share.mine:
        dtype = _cache_dtype(run.cfg, old)
        writer = SegmentWriter(run.out, run.fp, dtype, run.fp.feature_dim, SEGMENT_ROWS, run.limits)
        items, by_hash = run.catalog.items, share.by_hash
        sources = [items[by_hash[h][0]].file for h in share.mine]
        loaded = load_backbone(run.spec, run.cfg.weights_file)
        if loaded.fingerprint(run.precision) != run.fp:  # the weights file changed since _start
            raise BackboneError(f"the {run.spec.name} weights file changed while this run was scanning; run it again")
        _run_backbone(run.cfg, loaded, run.device, run.engine, run.precision, sources, share.mine, writer)
        share.location.update(writer.locations)
        share.bad.update(writer.bad)
        share.forget.update(writer.forget)
        share.segment_rows.update((s.name, s.n_rows) for s in writer.segments)
    return share


def _take(run: _Run, share: Scan, old: PreviousIndex | None, segments: list[SegmentInfo] | None = None) -> None:
    """Rows and skips of segments outside the index that this run may use (``adopt``); by
    default (rank 0, after the barrier) those the other ranks wrote."""
    if segments is None:
        segments = unindexed_segments(run.out, set(old.segment_rows if old else ()) | set(share.segment_rows))
    dtype, dim = _cache_dtype(run.cfg, old), run.fp.feature_dim
    share.segment_rows.update(adopt(segments, run.fp, dtype, dim, share.by_hash, share.location, share.bad, run.limits))


def _run_backbone(
    cfg: ExtractConfig,
    loaded: LoadedBackbone,
    device: torch.device,
    engine: str,
    precision: str,
    sources: Sequence[Source],
    keys: list[str],
    writer: SegmentWriter,
) -> None:
    """Features of ``sources`` (content hashes ``keys``) into ``writer``: a segment every
    ``SEGMENT_ROWS`` rows or ``COMMIT_EVERY_SECONDS``, the rest at the end. Photos that do not
    decode are recorded with their reason."""
    spec = loaded.spec
    loader = make_loader(
        sources,
        spec.preprocessing,
        device=device,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        max_pixels=cfg.max_pixels,
        decode=cfg.decode,
        # Each worker reads a file once, checks those bytes against the key it was hashed
        # under and decodes the same bytes: a photo rewritten mid-run is never stored under
        # its old key (it fails this run, unremembered, and the next run picks it up).
        expected_hashes=keys,
    )
    crop = spec.preprocessing.crop
    embed = engines.make_embedder(loaded.net, crop, engine=engine, device=device, precision=precision)
    last = time.monotonic()
    bar = tqdm(total=len(keys), desc=f"extract {spec.name}", unit="img", disable=not cfg.progress)
    try:
        for batch, feats in embed_batches(embed, loader, device=device):
            idx = batch.index.tolist()
            ok = batch.ok.tolist()
            good = [keys[i] for j, i in enumerate(idx) if ok[j]]
            for j, i in enumerate(idx):
                if not ok[j]:
                    writer.add_bad(keys[i], batch.errors[j], remember=not batch.retry[j])
            before = len(writer.segments)
            if good:
                writer.add(good, feats)
            bar.update(len(idx))
            if len(writer.segments) > before:
                last = time.monotonic()
            elif writer.pending and time.monotonic() - last > COMMIT_EVERY_SECONDS:
                writer.flush()
                last = time.monotonic()
        writer.flush()
    except WorkerError as e:
        writer.flush()  # what the live workers finished is kept too
        raise WorkerError(f"{e}; the rows finished so far are kept and the next run resumes from them") from None
    finally:
        bar.close()


def _assemble(run: _Run, share: Scan, old: PreviousIndex | None) -> IndexContents:
    """The next index: this scan's rows, labels and paths, with the run's provenance."""
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    attrs: dict[str, object] = dict(run.fp.to_record())
    attrs.update(
        created=(old.attrs.get("created", now) if old else now),
        updated=now,
        image_root=str(run.catalog.root),
        layout=run.catalog.layout,
        label_column=run.catalog.label_column,
        headstart_version=__version__,
        # Only for a run that left nothing to do: the next run with these inputs keeps the index.
        **{INPUTS_ATTR: "" if share.forget else share.inputs},
        torch_version=torch.__version__,
        config=json.dumps({**vars(run.cfg), "engine_used": run.engine}, default=str, ensure_ascii=False),
    )
    items = run.catalog.items
    return index_contents(
        share,
        [it.rel for it in items],
        [it.label for it in items],
        attrs=attrs,
        old_segment_rows=old.segment_rows if old else {},
        dtype=_cache_dtype(run.cfg, old),
        feature_dim=run.fp.feature_dim,
        limits=run.limits,
        attributes={name: [it.attributes[k] for it in items] for k, name in enumerate(run.catalog.attribute_names)},
    )
