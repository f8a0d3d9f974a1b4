"""Fine-tuning: augmentation, layer groups, the stage end to end, export, and resume after SIGKILL.

Plumbing runs on the tiny random backbone in fp32 (deterministic); the real-weights check of
what fine-tuning buys is bench/accuracy.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.artifacts.model_dir import load_model
from pipeline.config import ExportConfig, ExtractConfig, FinetuneConfig, FitHeadConfig
from pipeline.data.augment import augment, resolve_preset, sample_generator
from pipeline.errors import InputError
from pipeline.export import export
from pipeline.extract import extract
from pipeline.finetune.layers import layer_groups
from pipeline.finetune.stage import finetune
from pipeline.fit_head import fit_head
from pipeline.models.backbones import get_spec, load_backbone, with_preprocessing

REPO = Path(__file__).resolve().parents[1]
LIPSTICK = (178, 24, 61)


@pytest.fixture
def head_dir(small_catalog: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "f.h5"
    extract(ExtractConfig(images=str(small_catalog), out=str(cache), backbone="tiny", progress=False, workers=0))
    # Tiny random features are all near-duplicates by cosine: no grouping, or nothing validates.
    fit_head(FitHeadConfig(cache=str(cache), out=str(tmp_path / "head"), near_duplicate_threshold=None))
    return tmp_path / "head"


def _cfg(images: Path, head: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(epochs=3, batch_size=2, workers=0, precision="fp32", device="cpu", stages=2, progress=False)
    return FinetuneConfig(images=str(images), head=str(head), out=str(out), **{**base, **kw})


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("letterbox, squash", [(False, False), (True, False), (False, True)])
def test_augmentation_never_changes_colour(letterbox, squash):
    """A lipstick-red photo stays lipstick red: every output pixel is that red, white (the fill
    of rotated corners / the letterbox margin) or a blend of the two - no hue or saturation shift.
    squash: the photo is squashed to the square first, as prediction sees it (ViT/SigLIP recipes)."""
    prep = with_preprocessing(get_spec("efficientnet_lite0"), letterbox=letterbox, squash=squash).preprocessing
    img = Image.new("RGB", (300, 500), LIPSTICK)
    preset = resolve_preset("auto", prep)
    assert preset == ("letterbox" if letterbox else "product")
    for i in range(8):
        x = augment(img, prep, preset, sample_generator(0, 0, i))
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 224, 224)
        px = x.permute(1, 2, 0).reshape(-1, 3).numpy().astype(float)
        red, white = np.array(LIPSTICK, float), np.full(3, 255.0)
        t = np.clip(((px - red) @ (white - red)) / ((white - red) @ (white - red)), 0, 1)
        # On the red-white line; a few levels of slack for PIL's bicubic resize at the red/white edge,
        # which prediction-time preprocessing has too (torchvision's fill= was 34 levels off).
        assert np.abs(px - (red + t[:, None] * (white - red))).max() <= 5.0
        assert (np.abs(px - red).max(1) <= 1).mean() > (0.35 if letterbox else 0.8)  # 300x500: 60 % wide


def test_augmentation_of_a_squashing_recipe_samples_the_squashed_photo():
    """With squash, 'none' is exactly prediction's squash, and 'product' crops within the
    squashed square: a 1:3 strip whose top third is blue keeps blue in its crops' top rows
    (a centre crop of the strip would have cut the blue away)."""
    prep = with_preprocessing(get_spec("tiny"), squash=True, resize=32).preprocessing
    img = Image.new("RGB", (60, 180), LIPSTICK)
    img.paste((0, 0, 255), (0, 0, 60, 60))
    from pipeline.data.images import preprocess

    assert torch.equal(augment(img, prep, "none", sample_generator(0, 0, 0)), torch.from_numpy(preprocess(img, prep)))
    for i in range(4):
        x = augment(img, prep, "product", sample_generator(0, 0, i)).float()
        assert x.shape == (3, 32, 32)
        assert (x[2, :3] - x[0, :3]).mean() > 100, i  # blue above, as in the squashed photo


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    prep = get_spec("tiny").preprocessing
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    a = augment(img, prep, "product", sample_generator(1, 2, 3))
    assert torch.equal(a, augment(img, prep, "product", sample_generator(1, 2, 3)))
    assert not torch.equal(a, augment(img, prep, "product", sample_generator(1, 2, 4)))
    assert not torch.equal(a, augment(img, prep, "product", sample_generator(1, 3, 3)))


def test_augmentation_must_match_the_fingerprinted_framing():
    crop = get_spec("tiny").preprocessing
    boxed = with_preprocessing(get_spec("tiny"), letterbox=True).preprocessing
    with pytest.raises(InputError, match="letterboxed"):
        resolve_preset("product", boxed)
    with pytest.raises(InputError, match="--augment letterbox needs letterboxed features"):
        resolve_preset("letterbox", crop)
    assert resolve_preset("none", crop) == "none"


# --------------------------------------------------------------------------- layer groups


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0", "resnet50"])
def test_layer_groups_partition_the_network_top_down(name):
    from pipeline.models.heads import Classifier

    net = load_backbone(name, load_weights=False).net
    net.imagenet_head = None
    model = Classifier(net, torch.nn.Linear(net.feature_dim, 3))
    groups = layer_groups(model.net.body, model.head, stages=4)
    ids = [id(p) for g in groups.groups for u in g for _, p in u.params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert groups.groups[0][0].name == "head" and groups.n_backbone == (2 if name == "tiny" else 4)
    # the input layer is in the last (bottom) group, and learning rates fall going down
    first = next(iter(model.net.body.parameters()))
    assert any(p is first for u in groups.groups[-1] for _, p in u.params)
    lrs = {g["layer_group"]: g["lr"] for g in groups.param_groups(1e-3, 0.5, 0.05)}
    assert [lrs[i] for i in sorted(lrs)] == [1e-3 * 0.5**i for i in range(groups.n_backbone + 1)]
    groups.set_trainable(1)
    assert all(p.requires_grad for u in groups.groups[1] for _, p in u.params)
    assert not any(p.requires_grad for u in groups.groups[-1] for _, p in u.params)
    bns = [
        m for u in groups.groups[-1] for m0 in u.modules for m in m0.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert all(not m.training for m in bns)  # frozen BatchNorm keeps its statistics


# --------------------------------------------------------------------------- the stage


def test_finetune_end_to_end_and_export(small_catalog, head_dir, tmp_path):
    ft = tmp_path / "ft"
    s = finetune(_cfg(small_catalog, head_dir, ft, unfreeze_every=0.5, label_smoothing=0.1, class_weight="balanced"))
    doc = json.loads((ft / "finetune.json").read_text())
    head = json.loads((head_dir / "head.json").read_text())
    split = json.loads((head_dir / "split.json").read_text())
    # compared on the very photos fit-head held out
    assert s.n_val == doc["n_val"] == len(split["val_content_hash"]) == head["n_val"]
    assert s.n_train + s.n_val == 18 and doc["class_names"] == head["class_names"]
    assert [h["epoch"] for h in doc["history"]] == list(range(doc["epochs_run"] + 1))
    # LP-FT, 2 groups, one more every half epoch: top group first, then both
    assert [h["trainable_groups"] for h in doc["history"]][:3] == [0, 2, 2]
    assert doc["preprocessing"] == json.loads(head["fingerprint"]["preprocessing"])
    assert doc["metrics"]["loss"] == min(h["loss"] for h in doc["history"])  # the best epoch was kept
    assert not (ft / "checkpoint").exists() and s.images_per_s > 0
    assert doc["training"]["optimizer_steps"] == doc["epochs_run"] * 8  # 15 photos / batch 2
    model_dir = export(ExportConfig(head=str(ft), out=str(tmp_path / "model")))
    loaded = load_model(model_dir)
    assert loaded.manifest["provenance"]["source"] == "finetune"
    state = torch.load(ft / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())


def test_frozen_groups_do_not_move_under_adamw_weight_decay():
    """One AdamW step with weight decay, top group unfrozen: the bottom group is bit-identical
    (a frozen parameter has no gradient, so AdamW skips it, decay included)."""
    from pipeline.models.heads import Classifier

    net = load_backbone("tiny").net
    model = Classifier(net, torch.nn.Linear(32, 3))
    groups = layer_groups(model.net.body, model.head, stages=2)
    opt = torch.optim.AdamW(groups.param_groups(1e-2, 0.5, 0.05))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups.set_trainable(1)
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(after["net.body.net.0.weight"], before["net.body.net.0.weight"])  # bottom: frozen
    assert not torch.equal(after["net.body.net.2.weight"], before["net.body.net.2.weight"])  # top: trains
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_letterboxed_features_fine_tune_and_export_letterboxed(small_catalog, tmp_path):
    """The framing recorded in the head's fingerprint is the one fine-tuning trains and
    validates on and the one the exported model predicts with."""
    cache = tmp_path / "lb.h5"
    extract(ExtractConfig(images=str(small_catalog), out=str(cache), backbone="tiny", letterbox=True,
                          progress=False, workers=0))  # fmt: skip
    fit_head(FitHeadConfig(cache=str(cache), out=str(tmp_path / "head"), near_duplicate_threshold=None))
    with pytest.raises(InputError, match="letterboxed"):
        finetune(_cfg(small_catalog, tmp_path / "head", tmp_path / "ft", augment="product"))
    finetune(_cfg(small_catalog, tmp_path / "head", tmp_path / "ft", epochs=1))
    doc = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert doc["preprocessing"]["letterbox"] is True and doc["training"]["augment"] == "letterbox"
    loaded = load_model(export(ExportConfig(head=str(tmp_path / "ft"), out=str(tmp_path / "model"))))
    assert loaded.preprocessing.letterbox is True


def test_finetune_refuses_foreign_images(small_catalog, head_dir, tmp_path):
    other = tmp_path / "other"
    (other / "bag").mkdir(parents=True)
    Image.new("RGB", (40, 40), LIPSTICK).save(other / "bag" / "red.png")
    with pytest.raises(InputError, match="none of the 3 validation photos"):
        finetune(_cfg(other, head_dir, tmp_path / "ft"))
    (other / "lipstick").mkdir()
    Image.new("RGB", (40, 40), (0, 0, 0)).save(other / "lipstick" / "x.png")
    with pytest.raises(InputError, match="categories the head does not know: lipstick"):
        finetune(_cfg(other, head_dir, tmp_path / "ft"))


def test_cli_finetune(small_catalog, head_dir, tmp_path, run_cli):
    r = run_cli("finetune", small_catalog, "--head", head_dir, "--out", tmp_path / "ft", "--epochs", "1",
                "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "validation accuracy" in r.output and "linear probe" in r.output
    r = run_cli("finetune", small_catalog, "--head", tmp_path / "nope", "--out", tmp_path / "ft2")
    assert r.exit_code == 1 and r.output.startswith("Error: ")


# --------------------------------------------------------------------------- resume after SIGKILL


@pytest.mark.slow  # 15-30 s of real subprocesses; extract's kill -9 tests stay in the default suite
def test_resume_after_sigkill_matches_an_uninterrupted_run(small_catalog, head_dir, tmp_path):
    """A real process is SIGKILLed in the middle of epoch 2; --resume continues from its last
    checkpoint and ends with exactly the weights of a run that was never interrupted."""
    args = ["--epochs", "4", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--stages", "2", "--unfreeze-every", "1", "--checkpoint-every", "1", "--patience", "0"]  # fmt: skip
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline", "finetune", str(small_catalog), "--head", str(head_dir)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed), *args], stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ)
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "checkpoint: epoch 2, micro-batch 3/8" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(seen)
    assert (killed / "checkpoint" / "last.pt").is_file() and not (killed / "finetune.json").exists()
    ck = torch.load(killed / "checkpoint" / "last.pt", weights_only=True)
    assert ck["progress"]["epoch"] == 1 and 3 <= ck["progress"]["micro"] < 8  # mid-epoch 2

    cfg = _cfg(small_catalog, head_dir, killed, epochs=4, unfreeze_every=1, checkpoint_every=1, patience=0)
    with pytest.raises(InputError, match="pass --resume"):
        finetune(cfg)
    with pytest.raises(InputError, match="batch_size: 2 then, 4 now"):
        finetune(FinetuneConfig(**{**cfg.__dict__, "resume": True, "batch_size": 4}))
    resumed = finetune(FinetuneConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed.resumed_from == " (resumed)" and resumed.epochs_run == 4

    straight = finetune(FinetuneConfig(**{**cfg.__dict__, "out": str(tmp_path / "straight")}))
    a = torch.load(killed / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    ha = json.loads((killed / "finetune.json").read_text())["history"]
    hb = json.loads((tmp_path / "straight" / "finetune.json").read_text())["history"]
    assert [round(h["loss"], 6) for h in ha] == [round(h["loss"], 6) for h in hb]  # every epoch, not just the kept one
    assert len({round(h["loss"], 6) for h in ha}) == len(ha)  # and training changed the network each epoch
    assert straight.best_epoch == resumed.best_epoch


# --------------------------------------------------------------------------- torchrun / DDP


@pytest.fixture
def even_catalog(small_catalog: Path, tmp_path: Path) -> tuple[Path, Path]:
    """19 photos: fit-head holds out 3, leaving 16 to train - divisible by 2 ranks x batch 2, so
    DistributedSampler pads nothing and two ranks see exactly one process's batches."""
    from pipeline.data import SAMPLE_CATALOG

    extra = sorted((SAMPLE_CATALOG / "train" / "bag").glob("*.png"))[6]
    (small_catalog / "bag" / extra.name).write_bytes(extra.read_bytes())
    cache = tmp_path / "even.h5"
    extract(ExtractConfig(images=str(small_catalog), out=str(cache), backbone="tiny", progress=False, workers=0))
    fit_head(FitHeadConfig(cache=str(cache), out=str(tmp_path / "even_head"), near_duplicate_threshold=None))
    return small_catalog, tmp_path / "even_head"


@pytest.mark.slow  # 15-30 s; extract's 2-process torchrun test stays in the default suite
def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(even_catalog, tmp_path):
    """`torchrun --nproc_per_node=2` (gloo, CPU): DDP averages the two ranks' gradients, so 2 x
    batch 2 must train the same network as 1 x batch 4 - through a mid-epoch unfreezing, which
    rebuilds the DDP wrapper. Only rank 0 writes, and its FT_DIR exports and loads.
    ~14 s on the loaded 2-core CPU (three interpreters start), so it stays in the default suite."""
    images, head = even_catalog
    common = ["--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--stages", "2",
              "--unfreeze-every", "0.5", "--lr", "1e-2"]  # fmt: skip
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline", "finetune", str(images), "--head", str(head), "--out", str(ddp),
           "--batch-size", "2", *common]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("validation accuracy") == 1, r.stdout  # rank 1 prints nothing
    assert sorted(p.name for p in ddp.iterdir()) == ["config.json", "finetune.json", "model.pt"]
    doc = json.loads((ddp / "finetune.json").read_text())
    assert doc["training"]["world_size"] == 2 and doc["training"]["effective_batch"] == 4
    assert doc["n_train"] == 16 and doc["training"]["optimizer_steps"] == 4

    torch.set_num_threads(1)
    try:
        single = finetune(_cfg(images, head, tmp_path / "single", batch_size=4, epochs=1, unfreeze_every=0.5, lr=1e-2))
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    # Validation after the epoch, whichever epoch model selection keeps: same network, same loss.
    single_doc = json.loads((tmp_path / "single" / "finetune.json").read_text())
    assert doc["history"][1]["loss"] != doc["history"][0]["loss"]  # it did train
    assert doc["history"][1]["loss"] == pytest.approx(single_doc["history"][1]["loss"], abs=1e-5)
    assert single.best_epoch == doc["best_epoch"]
    a = torch.load(ddp / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "model.pt", weights_only=True)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    loaded = load_model(export(ExportConfig(head=str(ddp), out=str(tmp_path / "model"))))
    assert loaded.model is not None and loaded.class_names == doc["class_names"]


def test_gradient_accumulation_equals_the_bigger_batch(even_catalog, tmp_path):
    """2 micro-batches of 2 accumulated = one batch of 4 (16 training photos: no ragged window)."""
    images, head = even_catalog
    kw = dict(epochs=1, unfreeze_every=0.5, lr=1e-2, patience=0)
    finetune(_cfg(images, head, tmp_path / "accum", batch_size=2, accum_steps=2, **kw))
    finetune(_cfg(images, head, tmp_path / "big", batch_size=4, **kw))
    a = json.loads((tmp_path / "accum" / "finetune.json").read_text())
    b = json.loads((tmp_path / "big" / "finetune.json").read_text())
    assert a["training"]["optimizer_steps"] == b["training"]["optimizer_steps"] == 4
    assert a["history"][1]["loss"] != a["history"][0]["loss"]  # it trained
    assert a["history"][1]["loss"] == pytest.approx(b["history"][1]["loss"], abs=1e-5)
