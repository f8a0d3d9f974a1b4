"""``headstart backbones``: list the backbones (the default), import a library model's folder
for offline use, forget an imported one."""

from __future__ import annotations

import json

import click

from ..config import DEFAULT_BACKBONE
from .app import cli

_JSON_HELP = "Machine-readable output."


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.pass_context
def backbones(ctx: click.Context, as_json: bool) -> None:
    """List the backbones and whether each can be used offline right now (`backbones list`);
    `backbones import DIR --as NAME` makes a timm, Hugging Face or open_clip folder usable offline."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_backbones, as_json=as_json)


@backbones.command("list")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
def list_backbones(as_json: bool) -> None:
    """List built-in, imported and cached library backbones and whether each works offline."""
    from ..models.imported import listing

    rows = listing(DEFAULT_BACKBONE)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "ready  " if r["available"] else "missing"
        star = " (default)" if r["default"] else ""
        dim = f"{r['feature_dim']:>5}-d" if r["feature_dim"] else "       "
        size = f"{r['input']}px" if r["input"] else "     "
        click.echo(f"{mark}  {r['name']:<20} {dim}  {size}  {r['source']}{star}")
    if any(not r["available"] for r in rows):
        click.echo(
            "\n'missing': headstart never downloads; `headstart extract --backbone NAME ...` prints the one-line "
            "download to run on a machine with internet (or pass --weights-file); a library needs its extra; for a "
            "model copied from elsewhere, `headstart backbones import DIR --as NAME`."
        )


@backbones.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--as", "name", required=True, help="The name --backbone will use.")
@click.option(
    "--family", type=click.Choice(["timm", "hf", "open_clip"]), help="Library that wrote PATH. Default: detected."
)
@click.option("--image-size", type=click.IntRange(8, 4096), help="Default input size (NAME@SIZE overrides it).")
@click.option(
    "--pooling",
    type=click.Choice(["default", "cls", "mean", "cls+mean"]),
    help="Default pooling (NAME@SIZE:POOL overrides it). Default: the library's own.",
)
def import_backbone(path: str, name: str, family: str | None, image_size: int | None, pooling: str | None) -> None:
    """Record the model folder PATH (config.json + model.safetensors, as the library writes it)
    under NAME, with its sha256, so that --backbone NAME works with no network."""
    from ..models.imported import import_backbone as run
    from ..models.imported import registry_path

    e = run(path, name, family=family, size=image_size, pool=pooling)
    click.echo(
        f"imported {name}: {e['family']} {e['architecture']}, {e['feature_dim']}-d, {e['image_size']} px, "
        f"pooling {e['pooling']}, weights sha256 {e['weights_sha256'][:12]} (recorded in {registry_path()})"
    )


@backbones.command("remove")
@click.argument("name")
def remove_backbone(name: str) -> None:
    """Forget the imported backbone NAME (its folder is left as it is)."""
    from ..models.imported import remove

    remove(name)
    click.echo(f"removed {name}")
