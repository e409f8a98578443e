"""The ``bench`` command line (click; thin — it parses, resolves a config and calls into the modules).

Every bad value ends in one line ``error: ...`` naming the value and what is accepted, exit code 2, and nothing
written.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import BenchError

SWEEP_CONFIRM = 100  # runs a sweep launches without --yes


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items


def _positive_int(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value}; accepted: a positive integer")
    return value


def parse_eps(text: str, flag: str = "--eps", zero: bool = False) -> float:
    """An L∞ budget in pixel units as ``--set eps=`` reads it (``8/255``, ``0.03``): a number in (0, 1] (``zero``:
    [0, 1]), else a one-line error naming the value and what is accepted."""
    from .config import parse_value

    v = parse_value(text.strip())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= 1 if zero else 0 < v <= 1):
        raise BenchError(f"{flag} {text!r}; accepted: a {'number in [0, 1]' if zero else 'positive number ≤ 1'} "
                         "in pixel units, e.g. 8/255")
    return float(v)


CHECKPOINT_FORMATS = (".safetensors (a state dict or an aft-bench checkpoint) or .pt / .pth / .ckpt written by "
                      "torch.save (a state dict, or one under state_dict / net / model / model_state_dict)")


def check_checkpoint_file(path: Path, what: str) -> None:
    """A one-line error for a file that is no checkpoint at all (a Markdown, JSON or image file), by its first
    bytes: torch.save writes a zip (``PK``) or a pickle (``\\x80``); safetensors a little-endian header length and
    ``{``. What passes is read by :func:`bench.models.loading.read_weights` (weights only), which names any other
    problem."""
    with open(path, "rb") as f:
        head = f.read(4096)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or (
            len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8):
        return
    try:
        head.decode("utf-8")
        kind = "an empty file" if not head else "a text file" + (" (JSON)" if head.lstrip()[:1] in (b"{", b"[") else "")
    except UnicodeDecodeError:
        kind = "a file of another format"
    raise BenchError(f"{what + ' ' if what else ''}{path} is not a checkpoint: it is {kind}; accepted: "
                     f"{CHECKPOINT_FORMATS}")


def _presets() -> dict[str, dict]:
    """The presets of bench/configs/*.toml by name (for the help texts: what each sets)."""
    from .config import load_preset, preset_names

    return {n: load_preset(n) for n in preset_names()}


def _shown(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) if len(v) <= 4 else f"{len(v)} methods"
    return str(v)


def _by_preset(presets: dict[str, dict], key: str, default: str) -> str:
    """``; smoke: 500, cpu: 1000``: what the presets set ``[run] key`` to (where not the default), for an option's
    help."""
    vals = [f"{n}: {_shown(p['run'][key])}" for n, p in presets.items()
            if key in p["run"] and _shown(p["run"][key]) != default]
    return ("; " + ", ".join(vals)) if vals else ""


def _preset_help(presets: dict[str, dict]) -> str:
    """What --preset NAME switches, from the files: each preset's [run] values (flags override them)."""
    parts = []
    for n, p in presets.items():
        keys = [_shown(v) if k == "methods" and len(v) > 4 else f"{k.replace('_', '-')} {_shown(v)}"
                for k, v in p["run"].items() if k != "attacks"]
        epochs = " and each method's epochs" if p["method"] else ""
        parts.append(f"{n} sets {', '.join(keys)}{epochs}")
    return ("Preset name or path to a TOML file (bench/configs/*.toml; `bench list` describes them). A preset "
            "switches what it sets, flags override it: " + "; ".join(parts) + ".")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="aft-bench")
def cli() -> None:
    """aft-bench: adversarial fine-tuning and adversarial training, benchmarked side by side.

    \b
    bench run --preset smoke                      # a real benchmark on the embedded synthetic data (CPU minutes)
    bench run --methods natural,pgd-at --dataset cifar10 --arch resnet18 --data-dir DIR --seeds 0,1,2 --preset paper
    bench eval RUN_DIR_OR_CHECKPOINT --arch resnet18 --dataset cifar10 --attacks clean,pgd20,aa
    bench status                                  # runs under results/ and how far each got
    bench list                                    # methods, datasets, architectures, presets
    bench report                                  # the paper's tables and figures from results/
    bench perf                                    # engine vs a papers'-style loop: img/s, s/epoch, memory
    bench run --nproc 8 ...                       # one run on 8 GPUs (DDP, via torchrun)
    bench sweep ... --launcher slurm              # grids of runs: here, one per GPU, or Slurm arrays (submitit)
    """


# ---------------------------------------------------------------------------------------------------------------


@cli.command("list", short_help="Methods (and the model each starts from), datasets, architectures, presets.")
def list_cmd() -> None:
    """Methods (with the model each starts from), datasets, architectures and presets."""
    from methods import METHODS

    from .config import load_preset, preset_names
    from .data import describe_datasets
    from .models import MODELS

    datasets, presets = describe_datasets(), preset_names()
    w = max(len(n) for n in [*METHODS.names(), *MODELS.names(), *presets, *(n for n, _ in datasets)]) + 1
    click.echo("methods:")
    for n in METHODS.names():
        info, aliases = METHODS.info[n], METHODS.aliases(n)
        also = f" (also {', '.join(aliases)})" if aliases else ""
        click.echo(f"  {n:<{w}} starts from {info['starts_from']:<11} {info['paper']}{also}")
    click.echo("datasets:")
    for n, d in datasets:
        click.echo(f"  {n:<{w}} {d}")
    click.echo("architectures:")
    for n in MODELS.names():
        click.echo(f"  {n:<{w}} {MODELS.info[n].get('paper') or 'not a paper architecture (CPU smoke runs, tests)'}")
    for prefix, info in MODELS.family_info.items():
        click.echo(f"  {prefix + '<name>':<{w}} {info['paper']}")
    click.echo("presets:")
    for n in presets:
        click.echo(f"  {n:<{w}} {load_preset(n).get('description', '')}")


# ---------------------------------------------------------------------------------------------------------------


def _run_options(sweep: bool = False):
    """The options ``bench run`` and ``bench sweep`` share (sweep takes comma lists for --dataset / --arch and one
    --data-dir NAME=DIR per dataset)."""
    many = " (comma-separated: one run per value)" if sweep else ""
    presets = _presets()

    def dflt(key: str, default: str) -> str:
        return f"default: {default}{_by_preset(presets, key, default)}"

    data_dir = (click.option("--data-dir", "data_dir", multiple=True, metavar="[NAME=]DIR",
                             help="Folder (or archive) of the dataset; with several datasets NAME=DIR for each "
                                  "(repeatable).") if sweep else
                click.option("--data-dir", type=click.Path(path_type=str),
                             help="Folder (or archive) holding the dataset."))
    options = [
        click.option("--methods", "-m",
                     help="Comma-separated methods (see `bench list`); " + dflt("methods", "the preset's") + "."),
        click.option("--dataset", "-d", help=f"Dataset name{many} ({dflt('dataset', 'synthetic')})."),
        click.option("--arch", "-a", help=f"Architecture{many} ({dflt('arch', 'resnet18')})."),
        click.option("--seeds", "-s", help=f"Seeds: 0,1,2 or 0-2 ({dflt('seeds', '0')})."),
        click.option("--preset", "-p", help=_preset_help(presets)),
        data_dir,
        click.option("--download", is_flag=True, help="Download the dataset if it is not on disk (needs internet)."),
        click.option("--subset", type=int, callback=_positive_int,
                     help=f"Training images per class ({dflt('subset', 'all')})."),
        click.option("--epochs", type=int, callback=_positive_int,
                     help="Epochs of every listed method (default: the method's, or the preset's [method] tables)."),
        click.option("--batch-size", type=int, callback=_positive_int,
                     help="Batch size of every listed method (default: the method's, 128 for most)."),
        click.option("--lr", type=float, help="Base learning rate of every listed method (default: the method's)."),
        click.option("--eps", help="L∞ budget ε of every listed method, in pixel units, e.g. 8/255 (the same as "
                                   "--set eps=8/255; default: the method's, 8/255)."),
        click.option("--set", "sets", multiple=True, metavar="[METHOD.]KEY=VALUE",
                     help="Override any hyper-parameter, e.g. --set attack_steps=7 --set natural.epochs=50 "
                          "(repeatable; after --eps, so --set pgd-at.eps=4/255 overrides it for one method); "
                          "a bare comma list is a grid: --set afd.gamma=5,25,50."),
        click.option("--attacks", help=f"Evaluation attacks: clean,pgd20,aa ({dflt('attacks', 'clean,pgd20,aa')})."),
        click.option("--eval-n", type=int, callback=_positive_int,
                     help=f"Test images for clean and PGD-20 ({dflt('eval_n', 'all test images')})."),
        click.option("--aa-n", type=int, callback=_positive_int,
                     help=f"Test images for AutoAttack ({dflt('aa_n', 'those of --eval-n')})."),
        click.option("--aa-chunk", type=int, callback=_positive_int,
                     help=f"AutoAttack runs and saves its progress in chunks of this many images "
                          f"({dflt('aa_chunk', '1000')})."),
        click.option("--probe-n", type=int,
                     help=f"Test images of the per-epoch feature-gap probe, 0: off ({dflt('probe_n', '256')})."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=str, help="Training precision: fp32, bf16 (autocast) or fp64 (a slow "
                                                   f"reference; evaluation is always fp32) ({dflt('precision', 'fp32')})."),
        click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format (GPU)."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the training forward and the attacks' forward (parameters detached)."),
        click.option("--normalize/--no-normalize", default=None,
                     help="Put the training set's mean/std inside the model (default: raw [0,1] inputs, as AFD)."),
        click.option("--pretrained", type=click.Path(path_type=str),
                     help="Starting model for methods that fine-tune (default: the suite trains and reuses its own); "
                          "for a timm: arch also a timm checkpoint with an ImageNet head, which every model of the "
                          "command starts from (head new; see the README)."),
        click.option("--sync-bn/--no-sync-bn", default=True, show_default=True,
                     help="With several processes: BatchNorm over the global batch, so the run equals the one-process "
                          "run; --no-sync-bn keeps per-process statistics (faster; a different run)."),
        click.option("--results", "results_dir", default="results", show_default=True, help="Results directory."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars (epoch lines are still printed)."),
    ]
    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def _request(opts: dict, **over):
    """A RunRequest from the shared options."""
    from .runner import RunRequest

    _check_results_dir(opts["results_dir"])
    o = {**opts, **over}
    eps = [f"eps={parse_eps(o['eps'])!r}"] if o.get("eps") is not None else []  # as --set eps=8/255 would
    if o["pretrained"] is not None and Path(o["pretrained"]).is_file():
        check_checkpoint_file(Path(o["pretrained"]), "--pretrained")
    return RunRequest(methods=_csv(o["methods"]) if isinstance(o["methods"], str) else o["methods"],
                      dataset=o["dataset"], arch=o["arch"], seeds=o["seeds"], preset=o["preset"],
                      data_dir=o["data_dir"], subset=o["subset"], epochs=o["epochs"], batch_size=o["batch_size"],
                      lr=o["lr"], sets=eps + list(o["sets"]), attacks=o["attacks"], eval_n=o["eval_n"], aa_n=o["aa_n"],
                      aa_chunk=o["aa_chunk"], probe_n=o["probe_n"], device=o["device"], precision=o["precision"],
                      channels_last=o["channels_last"], compile=o["compile_"], normalize=o["normalize"],
                      pretrained=o["pretrained"], results_dir=o["results_dir"], download=o["download"],
                      sync_bn=o["sync_bn"])


@cli.command("run", short_help="Train and evaluate methods × seeds: Clean / PGD-20 / AutoAttack, s/epoch.")
@_run_options()
@click.option("--nproc", type=int, callback=_positive_int,
              help="Train every run on N processes with DistributedDataParallel: starts torchrun (one GPU per "
                   "process; CPU processes with --device cpu). Same as `torchrun --nproc_per_node N -m bench run`.")
def run_cmd(nproc, quiet, **opts) -> None:
    """Train and evaluate methods × seeds; prints Clean / PGD-20 / AutoAttack and seconds per epoch.

    Finished runs are not trained again; interrupted ones resume from their last checkpoint. Records land in
    RESULTS/runs/<dataset>_<arch>_<method>_s<seed>_<hash>/.

    \b
    On several GPUs: `bench run --nproc 8 ...` or `torchrun --nproc_per_node 8 -m bench run ...`. The global batch
    and the learning rate stay as configured; with --sync-bn (default) the run is the one-process run (same hash,
    resumable on any number of processes).
    """
    from .dist import Dist, launched_distributed, torchrun
    from .runner import execute_planned, format_table, plan, summary_rows

    req = _request(opts)
    if nproc and nproc > 1 and not launched_distributed():
        plan(req)  # every bad value fails here, before any process starts
        sys.exit(torchrun(nproc, sys.argv[1:], device=opts["device"]))
    dist = Dist.from_env(opts["device"], sync_bn=opts["sync_bn"])
    try:
        req.world_size = dist.world
        planned = plan(req)
        if not dist.enabled:
            from .dist import check_bf16
            from .devices import resolve_device

            dev = resolve_device(opts["device"])
            for p in planned:  # bf16 on a GPU without it: refused before anything is written
                check_bf16(dev, p.cfg.precision)
        runs = execute_planned(planned, dist=dist, progress=not quiet, echo=lambda s: click.echo(s, err=True))
        if dist.is_main:
            click.echo(format_table(summary_rows(runs)))
    finally:
        dist.close()


def _minutes(ctx, param, value):
    """--time: minutes, H:MM:SS or D-HH:MM:SS (Slurm's forms) → minutes."""
    if value is None:
        return None
    import re

    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?", value.strip())
    if not m:
        raise click.BadParameter(f"{value!r}; accepted: minutes (90), H:MM:SS (4:00:00) or D-HH:MM:SS (1-00:00:00)")
    d, a, b, c = m.groups()
    if b is None:  # plain minutes, or D-HH
        minutes = int(a) * (60 if d else 1)
    elif c is None:  # H:MM (Slurm reads MM:SS; a sweep's limit in seconds makes no sense)
        minutes = int(a) * 60 + int(b)
    else:
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    minutes += int(d or 0) * 24 * 60
    if minutes <= 0:
        raise click.BadParameter(f"{value!r}; accepted: a positive time limit")
    return minutes


@cli.command("sweep", short_help="Grids of runs (methods × datasets × archs × seeds × --set): here or Slurm.")
@_run_options(sweep=True)
@click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: here (one run after another, or --parallel runs at once, one per GPU); slurm: job arrays "
                   "submitted with submitit.")
@click.option("--gpus-per-run", type=int, default=1, show_default=True, callback=_positive_int,
              help="GPUs (DDP processes) per run: a job starts this many tasks forming one DDP group.")
@click.option("--parallel", type=int, callback=_positive_int,
              help="local: runs at once (default: visible GPUs // --gpus-per-run, at least 1).")
@click.option("--partition", help="slurm: the partition.")
@click.option("--time", "time_min", default="24:00:00", show_default=True, callback=_minutes,
              help="slurm: time limit per job (minutes, H:MM:SS, D-HH:MM:SS); a job that runs out is requeued and "
                   "resumes from its last checkpoint.")
@click.option("--array-parallelism", type=int, default=64, show_default=True, callback=_positive_int,
              help="slurm: jobs of an array running at once.")
@click.option("--cpus-per-task", type=int, callback=_positive_int, help="slurm: CPUs per task.")
@click.option("--mem-gb", type=float, help="slurm: memory per node (GB).")
@click.option("--account", help="slurm: the account.")
@click.option("--qos", help="slurm: the QOS.")
@click.option("--constraint", help="slurm: node features (e.g. a100|h100).")
@click.option("--slurm-arg", "slurm_args", multiple=True, metavar="KEY=VALUE",
              help="slurm: any other sbatch option (repeatable), e.g. --slurm-arg exclude=node12.")
@click.option("--cluster", type=click.Choice(["slurm", "local", "debug"]), default="slurm", show_default=True,
              help="slurm: submitit's executor — the cluster itself, or its stand-ins that run here (local: "
                   "processes, debug: this process) to rehearse a sweep without a cluster.")
@click.option("--dry-run", is_flag=True, help="Show every run and its state (done / running / todo); launch nothing.")
@click.option("--wait", is_flag=True, help="slurm / parallel local: wait until every launched job has finished.")
@click.option("--yes", is_flag=True, help=f"Launch even when the sweep has more than {SWEEP_CONFIRM} runs to launch "
              "(without it, such a sweep is refused: a stray range or grid is the likelier cause).")
def sweep_cmd(launcher, gpus_per_run, parallel, partition, time_min, array_parallelism, cpus_per_task, mem_gb,
              account, qos, constraint, slurm_args, cluster, dry_run, wait, quiet, yes, **opts) -> None:
    """Expand methods × datasets × architectures × seeds × --set grids into runs and launch what is neither done
    nor running.

    \b
    bench sweep --methods natural,pgd-at,afd,arrest --dataset cifar10,cifar100 --seeds 0-2 --preset paper \\
        --data-dir cifar10=/data/c10 --data-dir cifar100=/data/c100 --launcher slurm --partition gpu --time 8:00:00
    bench sweep ... --set afd.gamma=5,25,50 --launcher local --parallel 4     # 4 runs at once, one per GPU
    bench sweep ... --dry-run                                                 # what would run, and what is done

    \b
    Launchers:
      local   in this process, one run after another (like bench run); with --parallel K (default: one per visible
              GPU) K submitit local jobs, each pinned to its GPU(s) and running its share of the runs in turn.
      slurm   submitit job arrays: the base runs that fine-tuning methods start from first, then one job per run
              with --dependency=afterok on them. --partition, --time, --gpus-per-run, --array-parallelism,
              --account, --qos, --constraint, --cpus-per-task, --mem-gb, --slurm-arg KEY=VALUE. Jobs are
              checkpointable: on preemption or time-out Slurm requeues them and each run resumes from its last
              checkpoint.

    Every run is exactly the run `bench run` makes (same directory and hash). Launching again launches only what is
    neither done nor running: done runs are skipped, runs locked by a live process or held by a pending or running
    job of an earlier launch (RESULTS/sweeps/jobs.json) too.
    """
    from .runner import format_table, summary_rows
    from .sweep import LaunchOptions, SweepSpec, describe, launch, make_plan, parse_data_dirs

    datasets = _csv(opts["dataset"]) or [None]
    archs = _csv(opts["arch"]) or [None]
    data_dirs = parse_data_dirs(opts["data_dir"], datasets)
    req = _request({**opts, "dataset": None, "arch": None, "data_dir": None})
    req.world_size = gpus_per_run
    extra = {}
    for item in slurm_args:
        if "=" not in item:
            raise BenchError(f"malformed --slurm-arg {item!r}; accepted: KEY=VALUE (an sbatch option without --)")
        k, v = item.split("=", 1)
        extra[k.strip().lstrip("-")] = v
    spec = SweepSpec(req, datasets, archs, data_dirs)
    sp = make_plan(spec)
    c = sp.counts()
    click.echo(f"sweep: {len(sp.units)} run(s): {c['done']} done, {c['running']} running, {c['todo']} to launch"
               + (f" (+ {len(sp.bases)} base run(s) first)" if sp.bases else ""))
    if dry_run:
        for line in describe(sp):
            click.echo("  " + line)
        return
    if c["todo"] + len(sp.bases) > SWEEP_CONFIRM and not yes:
        raise BenchError(f"the sweep would launch {c['todo'] + len(sp.bases)} runs, more than {SWEEP_CONFIRM}; "
                         "accepted: --yes to launch them all, or --dry-run to list them first")
    opts_l = LaunchOptions(launcher=launcher, cluster=cluster, gpus_per_run=gpus_per_run, parallel=parallel,
                           partition=partition, time_min=time_min, array_parallelism=array_parallelism,
                           cpus_per_task=cpus_per_task, mem_gb=mem_gb, account=account, qos=qos,
                           constraint=constraint, slurm_args=extra, wait=wait)
    out = launch(spec, opts_l, echo=click.echo, quiet=quiet)
    if out.ran:
        from .records import RunDir

        names = {u.name: u for u in out.plan.units}
        click.echo(format_table(summary_rows([RunDir.for_config(names[n].cfg) for n in out.ran if n in names])))


def _check_results_dir(path: str, option: str = "--results", write: bool = True) -> None:
    """A one-line error, before anything is written, for a results (or output) directory that cannot be one: an
    empty name, a file, under a file, a symbolic link inside it to elsewhere, or (``write``) not writable."""
    from .fsutil import check_inside, check_writable_dir

    check_writable_dir(path, option, write=write)
    p = Path(path)
    for sub in ("runs", "sweeps", "tables", "figures"):
        q = p / sub
        if q.is_symlink():  # (only the link itself here: what is below is checked where each run is written)
            check_inside(p, q, what=f"{option} {path}:")
        if q.exists() and not q.is_dir():
            raise BenchError(f"{option} {path}: {q} is a file; accepted: a directory")


# ---------------------------------------------------------------------------------------------------------------


@cli.command("eval", short_help="Clean / PGD-20 / AutoAttack of a run, a checkpoint file or robustbench:<name>.")
@click.argument("target")
@click.option("--arch", "-a", help="Architecture of a checkpoint file (a run directory knows its own).")
@click.option("--dataset", "-d", help="Dataset (a run directory knows its own).")
@click.option("--data-dir", type=click.Path(path_type=str), help="Folder (or archive) holding the dataset.")
@click.option("--download", is_flag=True, help="Download the dataset if it is not on disk.")
@click.option("--attacks", default="clean,pgd20,aa", show_default=True, help="Comma-separated: clean, pgd20, aa.")
@click.option("--n", "n", type=int, callback=_positive_int, help="First n test images (default: all).")
@click.option("--eps", default="8/255", show_default=True, help="L∞ budget in pixel units.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the attacks' random starts.")
@click.option("--batch-size", type=int, default=256, show_default=True, callback=_positive_int)
@click.option("--device", default="auto", show_default=True)
@click.option("--normalize", is_flag=True,
              help="Checkpoint without normalisation buffers: use the dataset's mean/std (default: raw [0,1]).")
@click.option("--model-dir", default="models", show_default=True,
              help="For robustbench:<name>: the RobustBench model directory (<dir>/<dataset>/<threat>/<name>.pt).")
@click.option("--threat-model", default="Linf", show_default=True, help="For robustbench:<name>.")
@click.option("--output", "-o", type=click.Path(path_type=str), help="Write the evaluation record (JSON) here.")
@click.option("--quiet", "-q", is_flag=True)
def eval_cmd(target, arch, dataset, data_dir, download, attacks, n, eps, seed, batch_size, device, normalize,
             model_dir, threat_model, output, quiet) -> None:
    """Clean / PGD-20 / AutoAttack of TARGET: a run directory, a checkpoint file (.safetensors/.pt/.pth, also
    kuangliu, TRADES and AFD-author key names), or robustbench:<model name> (files already on disk). A run
    directory's eval.json gains the attacks it lacks (at the protocol's --eps 8/255; what it holds stands)."""
    if output is not None:
        out = Path(output)
        if output.strip() == "" or out.is_dir():
            raise BenchError(f"--output {output!r} is {'a folder' if output.strip() else 'empty'}; accepted: a "
                             f"file path for the JSON record (e.g. {out / 'eval.json' if output.strip() else 'eval.json'})")
        from .fsutil import check_writable_dir

        check_writable_dir(out.parent if str(out.parent) else ".", f"--output {output}: its folder")
    from .data import load_dataset
    from .devices import resolve_device
    from .evaluate import evaluate, parse_attacks
    from .fsutil import atomic_write_json
    from .models import create_model
    from .models.loading import load_weights
    from .records import RunDir

    attacks_l = parse_attacks(attacks)
    eps_v = parse_eps(eps, zero=True)
    dev = resolve_device(device)
    run = None
    if target.startswith("robustbench:"):
        if dataset is None:
            dataset = "cifar10"
        ds = load_dataset(dataset, data_dir, download=download)
        from .zoo import load_robustbench

        model = load_robustbench(target.split(":", 1)[1], dataset, threat_model, model_dir)
    else:
        path = Path(target)
        if path.is_dir():
            run = RunDir(path)
            run.check_place()  # its eval.json and eval-state are written in it: never through a link elsewhere
            if not run.config.is_file():
                raise BenchError(f"{path} is not a run directory (no config.json); accepted: a run directory, a "
                                 "checkpoint file, or robustbench:<name>")
            c = run.read_config()["config"]
            for flag, value, own in (("--arch", arch, c["arch"]), ("--dataset", dataset, c["dataset"])):
                if value is not None and value != own:
                    raise BenchError(f"{flag} {value} does not match the run's {own}")
            arch, dataset = c["arch"], c["dataset"]
            data_dir = data_dir or c.get("data_dir")
            weights = run.final_weights
            if not weights.is_file():
                raise BenchError(f"run {path} has no final weights yet ({weights}); finish it with bench run first")
            bad = run.weights_mismatch()
            if bad:
                raise BenchError(f"run {path.name}: {bad}; accepted: restore that file, or evaluate it as a "
                                 f"checkpoint file (bench eval {weights} --arch {arch} --dataset {dataset})")
        elif path.is_file():
            check_checkpoint_file(path, "")
            if arch is None or dataset is None:
                raise BenchError("a checkpoint file needs --arch and --dataset (see `bench list`)")
            weights = path
        else:
            raise BenchError(f"{target} does not exist; accepted: a run directory, a checkpoint file, or "
                             "robustbench:<name>")
        from .data import DATASETS
        from .models import MODELS

        DATASETS.get(dataset)
        MODELS.get(arch)
        ds = load_dataset(dataset, data_dir, download=download)
        if run is not None and c.get("data") and ds.fingerprint != c["data"]:  # its eval.json is about its data
            raise BenchError(f"the {dataset} data at {ds.source} (fingerprint {ds.fingerprint}) is not the data run "
                             f"{path.name} trained on ({c['data']}); accepted: its own data (--data-dir "
                             f"{c.get('data_dir') or 'as at training'}), or evaluate its weights file "
                             f"{run.final_weights} on other data")
        model = create_model(arch, ds.num_classes, ds.channels)
        load_weights(model, weights, normalize=ds.stats() if normalize else None)
        from .models.timm_backbone import check_input

        check_input(model, ds.channels, ds.image_size, arch)
    state_dir = run.ckpt_dir / "eval-state" if run is not None else None
    record = evaluate(model, ds.test, attacks_l, n=n, eps=float(eps_v), batch_size=batch_size, device=dev, seed=seed,
                      state_dir=state_dir, progress=not quiet)
    if run is not None:  # the run's eval.json gains the attacks it lacks (bench.evaluate.merge_eval)
        from .evaluate import eval_conflict, merge_eval

        existing = run.read_eval()
        why = eval_conflict(existing, record)
        if why:
            click.echo(f"note: {run.eval} is left as it was: {why}", err=True)
        else:
            merged, added = merge_eval(existing, record)
            if added:
                atomic_write_json(run.eval, merged)
    record["meta"]["target"] = target
    if output:
        atomic_write_json(output, record)
    res = record["results"]
    click.echo(f"{target}  ({dataset}, {arch or 'robustbench'}, device {record['meta']['device']})")
    for name, r in res.items():
        secs = f", {r['seconds']:.1f} s" if isinstance(r.get("seconds"), (int, float)) else ""
        click.echo(f"  {name:<6} {r['acc']:6.2f}%  ({r['correct']}/{r['n']}{secs})")
    flags = res.get("aa", {}).get("flags")
    if flags:
        click.echo("  AutoAttack flags: " + " | ".join(flags))
    for name, c in record.get("checks", {}).items():
        detail = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("passed", "messages"))
        click.echo(f"  check {name:<17} {'ok' if c['passed'] else 'FAILED'}  {detail}")
    if record.get("suspect"):
        click.echo(f"  SUSPECT: {', '.join(record['suspect'])}")


# ---------------------------------------------------------------------------------------------------------------


@cli.command("status", short_help="Every run under RESULTS/runs: done, running or partial, with its numbers.")
@click.option("--results", "results_dir", default="results", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
def status_cmd(results_dir, as_json) -> None:
    """Every run under RESULTS/runs: done, running (and by which process), or partial (epochs done)."""
    from .records import list_runs

    _check_results_dir(results_dir, write=False)
    runs = list_runs(results_dir)
    if not runs:
        click.echo(f"no runs under {Path(results_dir) / 'runs'}")
        return
    rows = []
    for run in runs:
        st = run.status()
        if st["state"] == "damaged":  # one line, with the path and what is wrong; the other runs go on
            if as_json:
                click.echo(json.dumps(st))
                continue
            hint = ("train it again: delete its ckpt/ and done" if "final weights" in st["damage"] else
                    "bench run of this run repairs it")
            rows.append(["damaged", f"{st['epoch']}/{st['epochs'] or '?'}", "—", "—", "—", st["run"],
                         f"{st['damage']}; {hint}"])
            continue
        record = run.read_eval() or {}
        ev = record.get("results", {})
        st.update({a: (ev.get(a) or {}).get("acc") for a in ("clean", "pgd20", "aa")})
        if as_json:
            click.echo(json.dumps(st))
            continue
        accs = ["—" if st[a] is None else f"{st[a]:.2f} (n={ev[a].get('n', '?')})" for a in ("clean", "pgd20", "aa")]
        holder = run.lock.holder() if st["state"] == "running" else None
        notes = ([f"process {holder[1]} on {holder[0]}"] if holder else []) + (
            [f"SUSPECT: {','.join(record['suspect'])}"] if record.get("suspect") else [])
        rows.append([st["state"], f"{st['epoch']}/{st['epochs'] or '?'}", *accs, st["run"], "; ".join(notes)])
    if rows:
        head = ["state", "epochs", "Clean", "PGD-20", "AA", "run", ""]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        for line in [head, ["-" * w for w in widths[:-1]] + [""], *rows]:
            click.echo(fmt.format(*line).rstrip())


# ---------------------------------------------------------------------------------------------------------------


@cli.command("report", short_help="The AFD paper's tables and figures from the run records, beside its numbers.")
@click.option("--results", "results_dir", default="results", show_default=True,
              help="Results directory whose runs/ are reported.")
@click.option("--out", "out_dir", type=click.Path(path_type=str),
              help="Where tables/, figures/ and index.html go (default: the results directory).")
@click.option("--reference", "reference", is_flag=False, flag_value="", default=None, metavar="[DIR]",
              help="Also show the project's shipped reference runs (DIR, default: the clone's results/reference), "
                   "labelled reference·…, beside your own; they are read, never written.")
def report_cmd(results_dir, out_dir, reference) -> None:
    """The AFD paper's Tables 1-5 and Figures 1a, 3, 4 (and two overview plots) from the run records, beside the
    paper's numbers: RESULTS/tables/*.md|csv|tex, RESULTS/figures/*.png|pdf and RESULTS/index.html.

    RESULTS (default results/) holds your runs; the project's own are in results/reference/ and enter only with
    --reference."""
    from .report import build, shipped_reference

    _check_results_dir(results_dir, "--results", write=out_dir is None)  # without --out, the report goes there
    if out_dir is not None:
        _check_results_dir(out_dir, "--out")
    if reference is not None:
        reference = reference or str(shipped_reference())
        _check_results_dir(reference, "--reference", write=False)
    build(results_dir, out_dir, echo=click.echo, reference=reference)


@cli.command("perf", short_help="The engine against a papers'-style loop: images/s, s/epoch, peak memory.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--methods", "-m", default=",".join(("natural", "pgd-at", "trades", "afd")), show_default=True)
@click.option("--arch", "-a", help="Architecture (default: resnet18 on a GPU, smallcnn on a CPU).")
@click.option("--batch-size", type=int, callback=_positive_int, help="Default: 128 on a GPU, 64 on a CPU.")
@click.option("--steps", type=int, callback=_positive_int, help="Timed steps per repeat (default 20 GPU / 4 CPU).")
@click.option("--repeats", type=int, callback=_positive_int, help="Timed rounds, engine and reference interleaved "
              "(default 3 GPU / 5 CPU).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed steps first.")
@click.option("--attack-steps", type=int, callback=_positive_int, help="Override the methods' PGD steps.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the engine (default: on a GPU, and on a CPU with a C++ compiler).")
@click.option("--precision", type=str, help="Engine training precision, fp32 or bf16 (default: bf16 where the device "
              "computes it natively: a GPU, a CPU with AMX / AVX512-BF16).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last in the engine (default: on a GPU).")
@click.option("--workers", type=int, help="DataLoader workers of the reference loop (default 4 GPU / 0 CPU).")
@click.option("--eval-n", type=int, callback=_positive_int, help="Images for the PGD-20 throughput.")
@click.option("--aa-n", type=int, help="Images for the AutoAttack pass (0: skip).")
@click.option("--science/--no-science", default=False, show_default=True,
              help="Also train PGD-AT in fp32 and bf16 and compare their accuracies.")
@click.option("--ablate-fused-step", is_flag=True,
              help="Also time the compiled engine stepping its attack eagerly (no fused PGD step), interleaved with "
                   "the other two: what the fused step buys on this device.")
@click.option("--out", "out_dir", default="results/perf", show_default=True)
@click.option("--label", help="Added to the file name (OUT/<device>-<date>-LABEL.json): a second setting on one day.")
def perf_cmd(device, methods, arch, batch_size, steps, repeats, warmup, attack_steps, compile_, precision,
             channels_last, workers, eval_n, aa_n, science, ablate_fused_step, out_dir, label) -> None:
    """The engine against a papers'-style reference loop, side by side in one process: images/s, seconds per
    CIFAR-10 epoch, peak memory, engine/reference ratios; PGD-20 and AutoAttack throughput. Writes
    OUT/<device>-<date>.json and .md."""
    from .perf import run_perf

    if warmup < 0 or (workers is not None and workers < 0) or (aa_n is not None and aa_n < 0):
        raise BenchError(f"bench perf: warmup {warmup}, workers {workers}, aa-n {aa_n}; accepted: integers ≥ 0")
    run_perf(device=device, arch=arch, methods=tuple(_csv(methods) or ()), batch=batch_size, steps=steps,
             repeats=repeats, warmup=warmup, attack_steps=attack_steps, compile_=compile_, precision=precision,
             channels_last=channels_last, workers=workers,
             eval_n=eval_n, aa_n=aa_n, science=science, out_dir=out_dir, label=label,
             ablate_fused_step=ablate_fused_step, echo=click.echo)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except BenchError as e:
        rank = int(os.environ.get("RANK", "0") or 0)
        click.echo(f"error{f' (rank {rank})' if rank else ''}: {e}", err=True)
        sys.exit(2)
    except click.UsageError as e:  # bad flag or flag value: one line, like every other input error
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `bench`: the help, as click shows it
            click.echo(e.format_message(), err=True)
            sys.exit(2)
        hint = f" (see bench {e.ctx.info_name} --help)" if e.ctx is not None and e.ctx.parent is not None else ""
        if isinstance(e, click.NoSuchOption) and e.ctx is not None and e.ctx.info_name in ("run", "sweep"):
            key = e.option_name.lstrip("-").replace("-", "_")  # a hyper-parameter given as a flag: --gamma 5
            hint = (f" (a hyper-parameter is set with --set {key}=VALUE or --set METHOD.{key}=VALUE; see bench "
                    f"{e.ctx.info_name} --help)")
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
