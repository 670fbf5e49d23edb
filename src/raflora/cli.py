"""The ``raflora`` command line: demo, run, synthetic, export, methods, config.

raflora demo                                  # the default federated comparison
raflora run examples/tiny.toml --set federation.method=flexlora --out runs/
raflora synthetic --out runs/synthetic        # rank collapse on a toy task in seconds
raflora export runs/tiny --rank 8 --out adapter/
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from raflora.config import Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated LoRA fine-tuning with heterogeneous client ranks (raFLoRA and baselines).",
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _setup(verbose: bool) -> None:
    """Logging to the terminal; quiet third-party chatter unless --verbose."""
    handler = RichHandler(console=err, show_path=verbose)
    if not verbose:  # our own INFO lines, everybody else's errors
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or r.name.startswith("raflora"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s", force=True)
    if not verbose:
        from raflora.federation.simulation import quiet_flower

        quiet_flower()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _print_table(table: Table) -> None:
    """A table whole: on a terminal at its width; piped or logged (where rich would squeeze
    it into 80 columns and cut headers and run names) at its natural width."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(1000), table).maximum
    Console(file=console.file, width=max(natural, console.width), soft_wrap=True).print(table)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")  # escaped: paths may hold [brackets]
    raise typer.Exit(2)


def _config(path: Path | None, overrides: list[str]) -> Config:
    """The validated config; else exit 2 with its problems on one line, separated by ``; ``."""
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        _fail("; ".join(str(error).splitlines()))
        raise  # unreachable


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="TOML config file (omit for defaults)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="parent folder of the run (run.out_dir)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="live progress display")] = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="run every check a run does before Ray starts (config, data, model, machine, "
            "devices, targets, ranks), print bytes per round and memory per client; train "
            "nothing, write nothing"
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a federated fine-tuning job (Flower simulation, Ray backend) from a TOML config.

    Writes config.toml, metrics.csv/json, plots/, checkpoints/ and adapter/ under
    <run.out_dir>/<run.name>. Every config field, its default and meaning: `raflora config`
    (also in the README). --dry-run validates everything without training and prints the
    bytes per round and memory per client. Exit code 2: refused before starting (one line
    naming the field); 1: finished, but rounds were skipped or a client failed every round.
    """
    _setup(verbose)
    overrides = list(set_ or []) + ([f"run.out_dir={str(out)!r}"] if out else [])
    cfg = _config(config, overrides)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if resume and not run_dir.is_dir():
        _fail(
            f"--resume: no run folder {run_dir} (run.out_dir / run.name); check run.name and "
            "--out, or drop --resume to start a new run"
        )
    if dry_run:
        _preflight(cfg, run_dir, resume=resume)
        _dry_run(cfg)
        console.print(f"checked: {run_dir} can {'resume' if resume else 'start'}")
        return
    summary = _simulate(cfg, resume=resume, progress=progress)
    from raflora.report import comparison_table, load_run

    _print_table(comparison_table([load_run(Path(cfg.run.out_dir) / cfg.run.name)]))
    console.print(f"outputs in [bold]{Path(cfg.run.out_dir) / cfg.run.name}[/]")
    if summary.get("problems"):  # skipped rounds, clients that never contributed
        for problem in summary["problems"]:
            err.print(f"[bold red]error:[/] {escape(problem)}")
        raise typer.Exit(1)


def _preflight(cfg: Config, run_dir: Path, *, resume: bool) -> None:
    """What `raflora run` checks before Ray starts (`preflight.check_run`); exit 2 on a problem."""
    from raflora.federation.checkpoint import CheckpointError
    from raflora.federation.preflight import RunSetupError, check_run

    try:
        check_run(cfg, run_dir, resume=resume)
    except (ConfigError, RunSetupError, CheckpointError) as error:
        _fail(str(error))


def _dry_run(cfg: Config) -> None:
    """Print `raflora.federation.dryrun.dry_run`'s findings, or fail in one line (exit 2)."""
    from raflora.federation.dryrun import DryRunError, dry_run

    try:
        found = dry_run(cfg)
    except DryRunError as error:
        _fail(" ".join(str(error).split()))
        raise
    model, data, targets = found["model"], found["data"], found["target_modules"]
    sizes = data["client_sizes"]
    lines = [
        f"model      {model['path']} ({model['architecture']}, {model['parameters']:,} "
        f"parameters, {model['weight_files']} weight file(s), {model['weight_mb']:.1f} MB) "
        f"in {model['dtype']}",
        f"devices    clients: {found['devices']['clients']}, server: {found['devices']['server']}",
        f"data       {data['train']} train / {data['test']} test examples; client shares "
        f"{min(sizes)}–{max(sizes)}",
        f"targets    {', '.join(targets['names'])}: {targets['layers']} layers "
        f"({', '.join(targets['shapes'])}), {targets['lora_params_per_rank']:,} LoRA "
        "parameters per unit rank",
        f"ranks      {found['ranks']} (all ≤ the smallest target width)",
        f"bytes      {found['bytes_per_round']:,} per round ({found['sampled_per_round']} "
        f"clients sampled, factors and heads both ways in {cfg.federation.wire_dtype})"
        + (
            ""
            if found["bytes_exact"]
            else f"; an estimate: {cfg.federation.method} sends {found['wire']} floats per "
            "module (README, method table)"
        ),
        "memory     per client, weights + LoRA training state (activations not included): "
        + ", ".join(f"{mb:,.0f} MB" for mb in found["memory_mb"]),
        f"ok: {cfg.run.name} would run {cfg.federation.rounds} rounds of "
        f"{cfg.federation.method} (nothing was trained)",
    ]
    for line in lines:
        console.print(escape(line))


def _simulate(cfg: Config, *, resume: bool, progress: bool) -> dict:
    from raflora.federation.checkpoint import CheckpointError
    from raflora.federation.preflight import RunSetupError
    from raflora.federation.progress import LogReporter, RichReporter
    from raflora.federation.simulation import run_federated

    reporter = RichReporter(console=err) if progress else LogReporter()
    try:
        return run_federated(cfg, resume=resume, reporter=reporter)
    except (ConfigError, RunSetupError, CheckpointError) as error:  # bad data, damaged resume
        _fail(str(error))
        raise


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="the demo's config")] = Path("examples/demo.toml"),
    methods: Annotated[
        str, typer.Option(help="comma-separated methods to compare")
    ] = "raflora,flexlora",
    out: Annotated[Path, typer.Option(help="folder for the runs and the comparison")] = Path(
        "runs/demo"
    ),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The default federated run: shipped MiniLM on Rotten Tomatoes, 8 clients with ranks
    {2, 4, 8, 16}, Dirichlet α = 0.5, raFLoRA vs FlexLoRA, then a comparison table. Runs an
    earlier demo left in --out are replaced."""
    _setup(verbose)
    if not config.is_file():
        _fail(
            f"--config {str(config)!r} does not exist; the default examples/demo.toml is relative "
            "to the repository root: run there, or pass --config PATH"
        )
    from raflora.federation.preflight import clear_run
    from raflora.report import comparison_markdown, comparison_table, load_run, plot_comparison

    runs = []
    for method in [m.strip() for m in methods.split(",") if m.strip()]:
        err.print(f"[bold]── {method}[/]")
        cfg = _config(
            config,
            [f"federation.method={method!r}", f"run.name='{method}'", f"run.out_dir={str(out)!r}"],
        )
        clear_run(out / method)  # the demo replaces its own earlier run, never mixes with it
        _simulate(cfg, resume=False, progress=True)
        runs.append(load_run(out / method))
    _print_table(comparison_table(runs))
    plots = plot_comparison(runs, out / "plots")
    (out / "comparison.md").write_text(comparison_markdown(runs) + "\n")
    console.print(f"comparison: {out / 'comparison.md'}")
    for path in plots:
        console.print(f"plot: {path}")
    console.print(
        f"per-run outputs (metrics, checkpoints, adapter): {', '.join(r['dir'] for r in runs)}"
    )


def _integers(option: str, text: str) -> tuple[int, ...]:
    """``"2,4,8"`` → (2, 4, 8); a ValueError naming ``option`` otherwise."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text!r}: comma-separated integers, e.g. 2,4,8") from None


def _switch(option: str, value: str) -> bool | None:
    """default | on | off → None | True | False (exit 2 naming the option otherwise)."""
    choices = {"default": None, "on": True, "off": False}
    if value not in choices:
        _fail(f"{option}: {value!r} is not one of default, on, off")
    return choices[value]


@app.command()
def synthetic(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/synthetic"),
    ranks: Annotated[
        str, typer.Option(help="client ranks, comma-separated")
    ] = "2,2,2,2,2,4,4,8,8,16",
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 40,
    local_steps: Annotated[int, typer.Option(help="gradient steps per client per round")] = 10,
    lr: Annotated[float, typer.Option(help="local learning rate")] = 0.1,
    fraction: Annotated[float, typer.Option(help="share of clients per round")] = 1.0,
    non_iid: Annotated[float, typer.Option(help="client heterogeneity (0 = IID)")] = 0.5,
    target_rank: Annotated[int, typer.Option(help="rank of the target update")] = 16,
    spectrum: Annotated[str, typer.Option(help="flat | linear | geometric")] = "linear",
    methods: Annotated[str, typer.Option(help="methods, comma-separated (empty = all)")] = "",
    carry_over: Annotated[
        str, typer.Option(help="default (each method's own: raflora only) | on | off")
    ] = "default",
    apply: Annotated[
        str, typer.Option(help="default (each method's own: flora merges) | adapter | merge")
    ] = "default",
    seed: Annotated[int, typer.Option()] = 0,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """Federated low-rank regression that shows rank collapse (and its prevention) in seconds."""
    from raflora.synthetic import SyntheticConfig, summarize
    from raflora.synthetic import run as run_synthetic

    try:
        cfg = SyntheticConfig(
            ranks=_integers("--ranks", ranks),
            rounds=rounds,
            local_steps=local_steps,
            lr=lr,
            fraction=fraction,
            non_iid=non_iid,
            target_rank=target_rank,
            spectrum=spectrum,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            carry_over=_switch("--carry-over", carry_over),
            apply=None if apply == "default" else apply,
            seed=seed,
        )
    except ValueError as error:
        _fail(str(error))
    results = run_synthetic(cfg, out, progress=progress)
    console.print(summarize(results))
    console.print(f"outputs in [bold]{out}[/] (results.json, metrics.csv, plots/)")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (with checkpoints/)")],
    out: Annotated[Path, typer.Option(help="folder for the PEFT adapter")],
    rank: Annotated[
        int | None,
        typer.Option(help="truncate to the best rank-R approximation (default: the whole update)"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write the global update as a PEFT adapter (whole, or its best rank-R approximation)."""
    _setup(verbose)
    from raflora.federation.checkpoint import CheckpointError
    from raflora.federation.export import export_run

    try:
        path, used = export_run(run_dir, out, rank)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        _fail(str(error))
    console.print(f"rank-{used} PEFT adapter written to [bold]{path}[/]")
    console.print("load it with: PeftModel.from_pretrained(base_model, path)")


@app.command()
def experiment(
    suite: Annotated[Path, typer.Argument(help="suite TOML file, e.g. examples/suite_tiny.toml")],
    out: Annotated[Path, typer.Option(help="parent folder of the suite's folder")] = Path("runs"),
    resume: Annotated[
        bool, typer.Option(help="skip finished runs, continue interrupted ones")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="runs at once (default: the suite's workers)")
    ] = None,
    executor: Annotated[
        str | None, typer.Option(help="inprocess or ray (default: the suite's executor)")
    ] = None,
    report_only: Annotated[
        bool, typer.Option(help="only rewrite the report from the finished runs")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="list the runs and exit")] = False,
    docs: Annotated[
        Path | None, typer.Option(help="also put the report into this markdown file")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a suite: methods × rank configurations × α × fraction × seeds as resumable runs under
    <out>/<suite name>/, then one report (report.md + plots/) with mean ± std over seeds."""
    _setup(verbose)
    from raflora.experiments import (
        SuiteError,
        expand,
        load_suite,
        prepare_report,
        run_suite,
        splice_into,
        write_report,
    )

    command = f"raflora experiment {suite} --out {out}" + (
        f" --workers {workers}" if workers else ""
    )
    try:
        spec = load_suite(suite)
        if dry_run:
            if spec.pretrain is not None:  # list the runs without pretraining first
                base = {
                    **spec.base,
                    "model": {**spec.base.get("model", {}), "path": spec.pretrain.model},
                }
                spec = spec.model_copy(update={"base": base})
            plan = expand(spec, out / spec.suite.name / "runs")
            for run_id, cfg in plan.configs.items():
                console.print(f"{run_id}  ({cfg.federation.method}, ranks {cfg.clients.ranks})")
            console.print(f"{len(plan.cells)} cells, {len(plan.configs)} runs")
            return
        if report_only:
            plan, suite_dir = prepare_report(spec, out)
            failed = 0
        else:
            state = run_suite(
                spec, out, resume=resume, workers=workers, executor=executor, echo=err.print
            )
            plan, suite_dir = state.plan, state.suite_dir
            failed = sum(v["status"] == "failed" for v in state.status.values())
        report = write_report(plan, suite_dir, command)
    except (SuiteError, ConfigError, FileExistsError) as error:
        _fail(str(error).replace("\n", "\n       "))
    console.print(f"report: [bold]{report}[/] (plots in {report.parent / 'plots'})")
    if docs is not None:
        splice_into(docs, report, spec.suite.name)
        summary = report.parent / "verdict.md"
        if summary.is_file():  # the claims and headroom tables also open the document
            splice_into(docs, summary, f"verdict-{spec.suite.name}", plots=False, top=True)
        console.print(f"report spliced into {docs}")
    if failed:
        err.print(f"[bold red]{failed} run(s) failed[/]: see {suite_dir / 'suite.json'}")
        raise typer.Exit(1)


def _receives(method: Any) -> str:
    """What a client of rank r starts a round from, in words."""
    if method.apply == "merge":
        return "each round's merged update (folded into its base) and a fresh LoRA"
    folded = " + each round's residual (folded into its base)" if method.residual else ""
    if method.allocation == "svd":
        return "the best rank-r truncation of the kept update (SVD)" + folded
    if method.frozen_a:
        return "the leading r columns of the averaged B, with A frozen at the shared A_0[:r]"
    return "the leading r columns of the kept averaged factors" + folded


@app.command()
def methods(
    details: Annotated[
        bool, typer.Option("--details", help="paper, code, protocol, defaults and options")
    ] = False,
) -> None:
    """List the registered aggregation methods (with --details: their protocol and options)."""
    import dataclasses

    from raflora.math import available_methods, get_method

    width = max(map(len, available_methods()))
    for name in available_methods():
        method = get_method(name)
        console.print(f"[bold]{name:{width}}[/] {method.summary}", highlight=False)
        if not details:
            continue
        options = [] if method.options is None else dataclasses.fields(method.options)
        lines = [
            f"paper: {method.paper}",
            *([f"code: {method.code}"] if method.code else []),
            f"client of rank r receives: {_receives(method)}",
            f"apply: {method.apply}; carry-over by default: {method.carry_over}; "
            f"equal ranks: {method.equal_ranks}; ranks may shrink: {method.ranks_may_shrink}",
            f"floats per module per round: {method.wire}",
            "options: " + (", ".join(f"{f.name}={f.default!r}" for f in options) or "none"),
        ]
        for line in lines:
            console.print(f"{'':{width}}   {line}", highlight=False, soft_wrap=True)


@app.command("config")
def show_config(
    markdown: Annotated[bool, typer.Option(help="as a markdown table")] = False,
) -> None:
    """Print every config field with its default and meaning."""
    from raflora.config_docs import as_markdown, as_text

    print(as_markdown() if markdown else as_text())


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
