"""``ddpmseg import-run``: the reference's model_{i}.pth files -> a ddpmseg run directory."""

from __future__ import annotations

import click


@click.command("import-run")
@click.argument("ref_dir", metavar="REF_DIR")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--config", "config_path", required=True, metavar="JSON|TOML",
              help="The reference's ddpm.json the classifiers were trained with (or a ddpmseg "
                   "config naming the same checkpoint, steps and blocks).")
@click.option("--preset", default=None, metavar="NAME|JSON",
              help="Model flags, when neither the ddpm.json (model_flags) nor a flags JSON "
                   "beside its checkpoint gives them. [default: lsun_256 for 256x256]")
@click.option("--overwrite", is_flag=True, help="Replace a run already in RUN_DIR.")
def command(ref_dir, run_dir, config_path, preset, overwrite):
    """Import the reference's trained pixel classifiers (REF_DIR/model_{i}.pth) as a run.

    REF_DIR is the folder of the model_{i}.pth files, or the ddpm.json's exp_dir above the
    <steps>_<blocks> folder the reference writes them to.
    The files are checked against the ddpm.json's dim and number_class; the run records the
    fingerprint of its checkpoint (model_path) and its steps and blocks, so `ddpmseg predict`
    and `ddpmseg evaluate` work on it as on any run. Its default vote is hard, as in the
    reference.

    \b
    Examples:
      ddpmseg import-run pixel_classifiers/ffhq_34/ddpm runs/ffhq34_ref \\
          --config experiments/ffhq_34/ddpm.json
      ddpmseg import-run old/models runs/mine --config ddpm.json --preset faces_64
    """
    from ddpmseg.interop.reference_config import is_reference_config, load_config
    from ddpmseg.interop.reference_run import import_run

    cfg = load_config(config_path, preset)
    if not is_reference_config(config_path):
        cfg = cfg.replace(model={"preset": preset})
    out = import_run(ref_dir, run_dir, cfg, overwrite=overwrite)
    click.echo(f"imported {cfg.classifier.ensemble} member(s) from {ref_dir} into {out}")
