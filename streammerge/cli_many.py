"""Commands for many merges and many machines: ``batch``, ``run-shard``, ``finalize``.

``cli`` adds them to its group; same rules: parse, one library call, render.
"""

from __future__ import annotations

import sys

import click

from .cli_params import SIZE, _friendly, _io, _polite


@click.command("run-shard")
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--shard", "index", type=click.IntRange(min=0), required=True, help="Shard index (0-based).")
@click.option("--max-memory", type=SIZE, default=None, help="Budget for this task.  [default: the plan's]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu")
@click.option(
    "--max-attempts", type=click.IntRange(min=1), default=3, help="Give up after this many attempts."
)
@_polite
@_friendly
def run_shard(
    plan_file, index, max_memory, threads, device, max_attempts, io_nice, max_read_rate, max_write_rate
):
    """Merge one output shard of a saved plan (a Slurm array task, a Kubernetes
    Indexed Job pod). Idempotent: a shard already done is not written again.

    Example: streammerge run-shard merged.plan.json --shard $SLURM_ARRAY_TASK_ID
    """
    from .shards import ShardOptions, load_plan
    from .shards import run_shard as run

    saved = load_plan(plan_file, max_memory=max_memory or 0)
    io = _io(io_nice, max_read_rate, max_write_rate)
    marker = run(saved.plan, saved.out, index, ShardOptions(threads, device, io, max_attempts))
    click.echo(f"shard {index} done: {marker['file']} ({marker['nbytes']} bytes, plan {marker['plan_hash']})")


@click.command()
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))
@_friendly
def finalize(plan_file) -> None:
    """Check every shard of a saved plan is done, then write the index, config and
    manifest and move OUT.partial/ to OUT/.

    Example: streammerge finalize merged.plan.json
    """
    from .shards import finalize as run_finalize
    from .shards import load_plan

    saved = load_plan(plan_file)
    run_finalize(saved.plan, saved.out, copy_tokenizer=saved.copy_tokenizer, force=saved.force)
    click.echo(
        f"finalized {saved.out}: {len(saved.plan.layout.shards)} shard(s), plan {saved.plan.plan_hash}"
    )


@click.command()
@click.argument("configs", metavar="CONFIG...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out-root", type=click.Path(file_okay=False), required=True, help="Outputs go to DIR/<name>.")
@click.option("--sweep", "sweeps", multiple=True, help="KEY=V1,V2,...; several --sweep make a grid.")
@click.option("--max-memory", type=SIZE, default=None, help="Bytes of tensor buffers for the whole batch.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu")
@click.option("--shard-size", "--out-shard-size", "shard_size", type=SIZE, default="5GB")
@click.option("--seed", type=int, default=0, help="Seed for methods that sample.")
@click.option("--force", is_flag=True, help="Replace non-empty outputs.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failing config.")
@_polite
@_friendly
def batch(
    configs, out_root, sweeps, max_memory, threads, device, shard_size, seed, force, fail_fast,
    io_nice, max_read_rate, max_write_rate,
) -> None:  # fmt: skip
    """Merge several configs (and sweeps of them) reading shared inputs once.

    Each output is OUT_ROOT/<config name>[-<sweep values>]; sweeps are listed in
    OUT_ROOT/sweep.json. A failing config does not stop the others (exit 1 at the end).

    Example: streammerge batch a.yml b.yml --out-root merged --sweep 'models[0].parameters.weight=0.3,0.7'
    """
    from .batch import members_from, run_batch, write_sweep_index

    members = members_from(configs, sweeps)
    summary = run_batch(
        members, out_root, max_memory=max_memory or 0, shard_nbytes=shard_size, threads=threads, device=device,
        seed=seed, force=force, fail_fast=fail_fast, io=_io(io_nice, max_read_rate, max_write_rate),
    )  # fmt: skip
    write_sweep_index(out_root, members, summary)
    click.echo("\n".join(summary.lines()))
    if summary.failed:
        sys.exit(1)
