"""``ddpmseg verify``: read every chunk of a store, or every member of a run."""

from __future__ import annotations

import click

from ddpmseg.cli.common import as_flags, scheduler_option


@click.command("verify")
@click.argument("path", metavar="STORE|RUN_DIR")
@scheduler_option("Check a store's images")
def command(path, scheduler):
    """Read every chunk of a feature store, or every file of a run dir, and list what is
    damaged: one line per problem (image or member, array or file, what is wrong) on
    stdout. Exits 1 when anything is damaged or incomplete, 0 when all is sound.

    A damaged store is repaired by rerunning its `ddpmseg extract` command with --repair
    (it re-extracts exactly the damaged images); a damaged member by deleting it and
    rerunning `ddpmseg fit`.

    \b
    Examples:
      ddpmseg verify stores/ffhq34_train.zarr
      ddpmseg verify runs/ffhq34
    """
    from ddpmseg.pipelines.verify import verify

    kind, damage = verify(path, scheduler=scheduler)
    for d in damage:
        click.echo(as_flags(str(d)))   # a hint names --overwrite, not overwrite=True
    if damage:
        click.echo(f"{path}: {len(damage)} problem(s) found in the {kind}", err=True)
        raise SystemExit(1)
    click.echo(f"{path}: the {kind} is sound")
