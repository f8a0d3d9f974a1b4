"""CLI: help everywhere, README mentions every command, errors without tracebacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands():
    return sorted(cli.commands)


def test_top_level_help_lists_the_pipeline(run_cli):
    r = run_cli("--help")
    assert r.exit_code == 0
    for name in ("extract", "fit-head", "export", "predict", "demo", "backbones"):
        assert name in r.output


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_and_is_documented(run_cli, command):
    r = run_cli(command, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output
    assert cli.commands[command].help, f"{command} has no docstring"
    assert f"headstart {command}" in README.read_text(encoding="utf-8"), f"README does not document {command}"


def test_backbones_lists_offline_availability(run_cli):
    r = run_cli("backbones")
    assert r.exit_code == 0
    assert "ready    efficientnet_lite0" in r.output
    line = next(line for line in r.output.splitlines() if " resnet50 " in line)
    assert line.split()[0] in {"ready", "missing"}


def _error(result) -> str:
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    return result.output


def test_missing_folder(run_cli, tmp_path):
    out = _error(run_cli("extract", tmp_path / "nope", "--out", tmp_path / "f.h5"))
    assert "Error:" in out and "does not exist" in out


def test_empty_folder(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = _error(run_cli("extract", tmp_path / "empty", "--out", tmp_path / "f.h5"))
    assert "Error: no images found" in out


def test_unknown_backbone(run_cli, small_catalog, tmp_path):
    out = _error(run_cli("extract", small_catalog, "--out", tmp_path / "f.h5", "--backbone", "resnet5000"))
    assert "Error: unknown backbone 'resnet5000'" in out and "efficientnet_lite0" in out


def test_one_class_only(run_cli, small_catalog, tmp_path):
    for cls in ("sneaker", "trouser"):
        shutil.rmtree(small_catalog / cls)
    r = run_cli(
        "extract", small_catalog, "--out", tmp_path / "f.h5", "--backbone", "tiny", "--no-progress", "--workers", "0"
    )
    assert r.exit_code == 0, r.output
    out = _error(run_cli("fit-head", tmp_path / "f.h5", "--out", tmp_path / "head"))
    assert "Error:" in out and "one class only ('bag')" in out


def test_bad_option_value_exits_2(run_cli, tmp_path):
    r = run_cli("extract", tmp_path, "--precision", "fp8")
    assert r.exit_code == 2 and "Invalid value" in r.output


def test_config_file_defaults_and_flags_win(run_cli, small_catalog, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[extract]\nbackbone = "tiny"\nout = "{tmp_path / "from_config.h5"}"\nworkers = 0\nprogress = false\n'
        f"[fit-head]\nval-fraction = 0.5\n"
    )
    r = run_cli("--config", cfg, "extract", small_catalog)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "from_config.h5").is_file()
    r = run_cli("--config", cfg, "extract", small_catalog, "--out", tmp_path / "flag.h5")
    assert r.exit_code == 0 and (tmp_path / "flag.h5").is_file()
    r = run_cli("--config", cfg, "fit-head", tmp_path / "flag.h5", "--out", tmp_path / "head")
    assert r.exit_code == 0, r.output
    import json

    used = json.loads((tmp_path / "head" / "config.json").read_text())
    assert used["val_fraction"] == 0.5


def test_shipped_configs_parse():
    from pipeline.config import load_default_map

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in root.glob("*.toml"):
        m = load_default_map(path)
        for command in m:
            assert command in cli.commands, f"{path.name}: unknown command table [{command}]"
            params = {p.name for p in cli.commands[command].params}
            assert set(m[command]) <= params, f"{path.name} [{command}]: {set(m[command]) - params}"


def test_python_dash_m_works():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "headstart" in r.stdout


@pytest.mark.parametrize(
    ("command", "stage", "says"),
    [
        ("extract", "pipeline.extract.extract", "finished batches are kept and the next run resumes"),
        ("fit-head", "pipeline.fit_head.fit_head", "the previous head, if any, is unchanged"),
        ("finetune", "pipeline.finetune.stage.finetune", "run again with --resume to continue"),
        ("predict", "pipeline.predict.predict", "the previous output file, if any, is unchanged"),
        ("similar", "pipeline.similar.similar", "nothing was written"),
    ],
)
def test_ctrl_c_says_what_each_command_leaves_behind(command, stage, says, monkeypatch, tmp_path, run_cli):
    """Only extract (and finetune --resume) continue where they stopped; the others must not
    promise it."""

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, interrupted)
    args = {
        "extract": ["extract", tmp_path],
        "fit-head": ["fit-head", tmp_path / "f.h5"],
        "finetune": ["finetune", tmp_path, "--head", tmp_path],
        "predict": ["predict", tmp_path, tmp_path],
        "similar": ["similar", tmp_path / "f.h5", "--cache", tmp_path / "f.h5"],
    }[command]
    (tmp_path / "f.h5").write_bytes(b"")
    from click.testing import CliRunner

    from pipeline.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 130 and says in r.output, r.output
    if command != "extract":
        assert "resumes" not in r.output
