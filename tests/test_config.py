"""Config: the dataclasses are the one source of defaults; the CLI options and
configs/default.toml follow from them; --config files are checked, before or after the command."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import click
import pytest

from pipeline.cli import cli
from pipeline.config import COMMANDS, default_toml, has_default, load_default_map
from pipeline.errors import InputError

DEFAULT_TOML = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
REGENERATE = 'python -c \'import pipeline.config as c; open("configs/default.toml", "w").write(c.default_toml())\''


def _key(name: str) -> str:
    return name.replace("_", "-")


def _defaults(cls: type) -> dict[str, object]:
    """Fields with a default TOML writes (not None, not an empty list), by TOML key."""
    return {_key(f.name): f.default for f in dataclasses.fields(cls) if has_default(f) and f.default not in (None, ())}


def test_default_toml_is_generated_from_the_dataclasses():
    assert DEFAULT_TOML.read_text(encoding="utf-8") == default_toml(), f"regenerate it: {REGENERATE}"


def test_default_toml_holds_exactly_the_dataclass_defaults():
    text = DEFAULT_TOML.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert list(data) == list(COMMANDS)
    for command, cls in COMMANDS.items():
        assert data[command] == _defaults(cls), command
        # Fields whose default is None cannot be written in TOML; they are there as comments.
        section = text.split(f"[{command}]\n", 1)[1].split("\n\n", 1)[0]
        for f in dataclasses.fields(cls):
            if has_default(f) and f.default in (None, ()):
                assert re.search(rf"^# {_key(f.name)} =", section, re.M), f"[{command}] {f.name} not documented"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_config_field_is_an_option_with_the_dataclass_default(command):
    """No field is unreachable, and the CLI does not keep defaults of its own."""
    params = {p.name: p for p in cli.commands[command].params}
    for f in dataclasses.fields(COMMANDS[command]):
        assert f.name in params, f"{command}: field {f.name} has no option"
        p = params[f.name]
        if not has_default(f):
            assert p.required, f"{command} {f.name}"
        elif f.default is None or f.default is False:
            assert p.default in (None, False) or repr(p.default) == "Sentinel.UNSET", f"{command} {f.name}"
        else:
            assert p.default == f.default, f"{command} {f.name}: {p.default!r} != dataclass {f.default!r}"
    extra = set(params) - {f.name for f in dataclasses.fields(COMMANDS[command])} - {"config", "as_json"}
    assert not extra, f"{command}: options without a config field: {extra}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_the_dataclass_defaults(command):
    cmd = cli.commands[command]
    ctx = click.Context(cmd, info_name=command)
    params = {p.name: p for p in cmd.get_params(ctx)}
    for f in dataclasses.fields(COMMANDS[command]):
        record = params[f.name].get_help_record(ctx)
        if not has_default(f) or f.default is None or f.default is False or f.default == ():
            continue
        assert record, f"{command} {f.name} is not in --help"
        shown = _key(f.name) if f.default is True else str(f.default)
        assert re.search(rf"\[default: {re.escape(shown)}[;\]]", record[1]), f"{command} {f.name}: {record}"


def test_shipped_configs_load():
    for path in DEFAULT_TOML.parent.glob("*.toml"):
        load_default_map(path)


@pytest.mark.parametrize("where", ["before", "after"])
def test_unknown_key_is_an_error_naming_the_valid_ones(run_cli, tmp_path, where):
    cfg = tmp_path / "f.toml"
    cfg.write_text("[extract]\nbatchsize = 8\n")
    args = ["--config", cfg, "extract", tmp_path] if where == "before" else ["extract", tmp_path, "--config", cfg]
    r = run_cli(*args)
    assert r.exit_code == 1, r.output
    assert "Error:" in r.output and "Traceback" not in r.output
    assert "batchsize" in r.output and "batch-size" in r.output
    for key in ("backbone", "precision", "workers", "max-pixels"):
        assert key in r.output


@pytest.mark.parametrize("where", ["before", "after"])
def test_unknown_table_is_an_error_naming_the_valid_ones(run_cli, tmp_path, where):
    cfg = tmp_path / "f.toml"
    cfg.write_text("[extrakt]\nbatch-size = 8\n")
    args = ["--config", cfg, "extract", tmp_path] if where == "before" else ["extract", tmp_path, "--config", cfg]
    r = run_cli(*args)
    assert r.exit_code == 1, r.output
    assert "Error:" in r.output and "[extrakt]" in r.output
    for table in COMMANDS:
        assert f"[{table}]" in r.output


def test_config_errors(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('backbone = "tiny"\n')
    with pytest.raises(InputError, match=r"outside a table.*\[extract\]"):
        load_default_map(cfg)
    cfg.write_text("[extract\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_default_map(cfg)
    with pytest.raises(InputError, match="does not exist"):
        load_default_map(tmp_path / "nope.toml")


def test_dashes_and_underscores(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text("[fit_head]\nval_fraction = 0.5\nmax-iter = 10\n[predict]\ntop-k = 5\n")
    assert load_default_map(cfg) == {"fit-head": {"val_fraction": 0.5, "max_iter": 10}, "predict": {"top_k": 5}}


def test_bad_value_in_config_is_a_usage_error_naming_the_file(run_cli, tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[extract]\nprecision = "fp8"\n')
    r = run_cli("extract", tmp_path, "--config", cfg)
    assert r.exit_code == 2 and "Invalid value for '--precision'" in r.output and "f.toml" in r.output


def test_missing_config_file(run_cli, tmp_path):
    r = run_cli("--config", tmp_path / "nope.toml", "extract", tmp_path)
    assert r.exit_code == 1 and "Error: config file" in r.output and "does not exist" in r.output


def test_config_after_the_command_sets_defaults_and_flags_win(run_cli, small_catalog, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[extract]\nbackbone = "tiny"\nout = "{tmp_path / "from_config.h5"}"\nworkers = 0\nprogress = false\n'
        '[fit-head]\nval-fraction = 0.5\nhead = "centroid"\n'
    )
    r = run_cli("extract", small_catalog, "--config", cfg)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "from_config.h5").is_file()
    r = run_cli(
        "fit-head", tmp_path / "from_config.h5", "--config", cfg, "--out", tmp_path / "head", "--head", "logreg"
    )
    assert r.exit_code == 0, r.output
    used = json.loads((tmp_path / "head" / "config.json").read_text())
    assert used["val_fraction"] == 0.5 and used["head"] == "logreg"


def test_config_after_the_command_shows_in_help(run_cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[predict]\ntop-k = 7\n[extract]\nbackbone = "tiny"\n')
    r = run_cli("predict", "--config", cfg, "--help")
    assert r.exit_code == 0 and "[default: 7;" in r.output
