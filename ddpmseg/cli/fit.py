"""``ddpmseg fit``: a feature store -> a trained ensemble (a run directory)."""

from __future__ import annotations

import logging

import click

from ddpmseg.config import ETF_MODES
from ddpmseg.cli.common import (
    config_option,
    count,
    device_option,
    renamed_option,
    resolve_config,
    scheduler_option,
    show_progress,
    threads_option,
)

log = logging.getLogger(__name__)


@click.command("fit")
@click.argument("store", metavar="STORE")
@click.argument("run_dir", metavar="RUN_DIR")
@config_option
@click.option("--ensemble", type=click.IntRange(min=1), default=None, metavar="K",
              help="Number of pixel MLPs in the ensemble. [default: config, 10]")
@click.option("--etf", type=click.Choice(ETF_MODES), default=None,
              help="ETF regulariser: on the classifier's own features (shared), on a separate "
                   "trunk as in the seed code (separate, no effect on predictions), or off "
                   "(none, the original method). [default: config, shared]")
@click.option("--etf-weight", type=click.FloatRange(min=0), default=None, metavar="W",
              help="Weight of the ETF loss. [default: config, 0.4]")
@click.option("--max-epochs", "max_epochs", type=click.IntRange(min=1), default=None,
              metavar="N", help="Maximum epochs per member (early stopping usually ends "
                                "sooner). [default: config, 100]")
@renamed_option("--epochs", "--max-epochs", "max_epochs", type=click.IntRange(min=1))
@click.option("--pixels-per-batch", type=click.IntRange(min=2), default=None, metavar="N",
              help="Pixels per minibatch (classifier.pixels_per_batch). [default: config, 64]")
@renamed_option("--batch-size", "--pixels-per-batch", "pixels_per_batch",
                type=click.IntRange(min=2))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate. [default: config, 0.001]")
@click.option("--seed", type=int, default=None,
              help="Member k is seeded with SEED + k. [default: config, 0]")
@click.option("--ram-budget-gb", "ram_budget_gb", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="GB",
              help="Memory for the training features: on a CPU the dense features of every "
                   "labelled pixel when they fit (fastest), else a pool of stored maps that "
                   "minibatches are computed from (GPU memory when training on CUDA). It also "
                   "sets how many images are "
                   "shuffled together: resuming with a value that shuffles another number is "
                   "refused. [default: config, 2]")
@renamed_option("--ram-budget", "--ram-budget-gb", "ram_budget_gb",
                type=click.FloatRange(min=0, min_open=True))
@click.option("--in-memory", is_flag=True,
              help="Hold the dense features of all labelled pixels in RAM, as the reference "
                   "does (~2.2 GB per 256px image at 8448 dims); same result as streaming.")
@device_option
@threads_option("fit")
@scheduler_option("Train the members in parallel", "STORE", outcome="")
@click.option("--overwrite", is_flag=True,
              help="Start over in a RUN_DIR that holds another run.")
@click.pass_context
def command(ctx, store, run_dir, config_path, ensemble, etf, etf_weight, max_epochs,
            pixels_per_batch, lr, seed, ram_budget_gb, in_memory, device, threads, scheduler, overwrite):
    """Train an ensemble of pixel classifiers on the labelled pixels of STORE into RUN_DIR.

    Minibatches are computed on the fly from the stored native-resolution maps, in a RAM
    budget independent of the number of images. Each member is saved as it finishes;
    rerunning the same command resumes with the next one. The classes, ignore label and
    feature settings come from the store. The config is --config, else the one the store was
    extracted with (its name, classes and [classifier] section), and the command says which in
    one line; a --config of other classes than the store's is refused. Each option overrides
    its key of [classifier].

    \b
    Examples:
      ddpmseg fit stores/ffhq34_train.zarr runs/ffhq34 --config ffhq_34
      ddpmseg fit stores/mine.zarr runs/mine --ensemble 3 --etf none --ram-budget-gb 4
    """
    from ddpmseg.classifier import fit, load_ensemble
    from ddpmseg.classifier.train import store_config
    from ddpmseg.featcache.store import FeatureStore

    opened = FeatureStore.open(store)
    base, origin = store_config(opened)
    if config_path is not None:
        origin = f"from --config {config_path}"
    cfg = resolve_config(config_path, base, classifier={
        "ensemble": ensemble, "etf": etf, "etf_weight": etf_weight, "max_epochs": max_epochs,
        "pixels_per_batch": pixels_per_batch, "lr": lr, "seed": seed, "ram_budget_gb": ram_budget_gb})
    log.info("fit: config %s (%s)", cfg.data.name, origin)
    out = fit(opened, run_dir, cfg, device=device, in_memory=in_memory, resume=not overwrite,
              scheduler=scheduler, progress=show_progress(ctx), threads=threads)
    ens = load_ensemble(out, "cpu")
    # Epochs trained per member (stop_epoch is stored 0-based).
    epochs = ", ".join(str(m["stop_epoch"] + 1) if m.get("stop_epoch") is not None else "?"
                       for m in ens.metas)
    click.echo(f"{out}: {count(len(ens), 'member')}, {ens.num_classes} classes, "
               f"{ens.feature_dim} dims (epochs trained: {epochs})")
