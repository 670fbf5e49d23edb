"""The suite report: markdown tables (mean ± std over seeds) and plots, from the finished runs.

``report.md`` has, per grid and setting (rank configuration · Dirichlet α · fraction per
round): a table of final and best accuracy, top-r_min energy share, effective rank, ‖ΔW‖_F,
bytes per round and wall time (plus per-task accuracy for multiple-choice mixtures), and
plots of accuracy, energy per rank partition and ‖ΔW‖_F vs round; per grid with several rank
configurations, final accuracy vs rank configuration; per suite, predicted retention c_i vs
the measured retention for FlexLoRA. The numbers are written only here: documents include the
report with `splice_into` instead of copying numbers by hand.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from raflora.experiments import figures, verdict
from raflora.experiments.results import (
    RunResult,
    bounds_of,
    group_cells,
    load_results,
    mean_std,
    partition_energy,
    retention_series,
    run_metrics,
    score,
    seed_metrics,
    series,
)
from raflora.experiments.stats import LEVEL, direction, mean_ci, paired_difference
from raflora.experiments.suite import Cell, Plan
from raflora.report import COLUMNS  # key, title, format: the same columns as `raflora run`

VERDICT = "verdict.md"


def cell_text(stats: tuple[float, float, int] | None, fmt: str) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    return format(mean, fmt) if n == 1 else f"{format(mean, fmt)} ± {format(std, fmt)}"


def setting_title(setting: tuple) -> str:
    rank_config, alpha, fraction = setting
    alpha_text = (
        "data partition of the base config" if alpha is None else f"Dirichlet α = {alpha:g}"
    )
    share = "all clients" if fraction == 1 else f"{fraction:g} of the clients"
    return f"{rank_config} · {alpha_text} · {share} per round"


def setting_slug(setting: tuple, prefix: str = "") -> str:
    rank_config, alpha, fraction = setting
    alpha_tag = "base" if alpha is None else f"a{alpha:g}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}{rank_config}_{alpha_tag}_f{fraction:g}")


class ReportWriter:
    """Builds report.md and plots/ for a plan from its finished runs."""

    def __init__(self, plan: Plan, suite_dir: Path) -> None:
        self.plan = plan
        self.suite_dir = Path(suite_dir)
        self.results = load_results(plan, self.suite_dir / "runs")
        self.data = seed_metrics(plan, self.results)  # every grid; shared runs once
        self.roles = verdict.roles_of(plan.suite)
        self.plots = self.suite_dir / "plots"
        self.lines: list[str] = []

    # ------------------------------------------------------------------ helpers
    def runs_of(self, cells: list[Cell]) -> list[RunResult]:
        return [self.results[c.run_id] for c in cells if c.run_id in self.results]

    def image(self, path: Path, alt: str) -> None:
        self.lines += [f"![{alt}](plots/{path.name})", ""]

    def table(self, by_method: dict[str, list[Cell]], bounds: list[int]) -> None:
        header = ["method", "seeds", *(title for _, title, _ in COLUMNS)]
        self.lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        task_rows = {}
        for method, cells in by_method.items():
            metrics = [run_metrics(r, bounds) for r in self.runs_of(cells)]
            cells_text = [cell_text(mean_std([m[k] for m in metrics]), f) for k, _, f in COLUMNS]
            seeds = f"{len(metrics)}/{len(cells)}"
            self.lines.append(f"| {method} | {seeds} | " + " | ".join(cells_text) + " |")
            tasks = sorted({t for m in metrics for t in m["tasks"]})
            if tasks:
                task_rows[method] = {
                    t: mean_std([m["tasks"].get(t) for m in metrics]) for t in tasks
                } | {"average": mean_std([m["final_accuracy"] for m in metrics])}
        self.lines.append("")
        if task_rows:
            names = list(next(iter(task_rows.values())))
            self.lines += [
                "Accuracy per task at the last round (average = over all questions):",
                "",
                "| method | " + " | ".join(names) + " |",
                "|---" * (len(names) + 1) + "|",
            ]
            for method, row in task_rows.items():
                values = [cell_text(row.get(n), ".3f") for n in names]
                self.lines.append(f"| {method} | " + " | ".join(values) + " |")
            self.lines.append("")

    def stats_table(self, setting: tuple, methods: list[str]) -> None:
        """Final score (accuracy, or −loss): mean and 95% CI over seeds, and the paired
        difference to raflora (same seeds) with its CI and whether the method is better / worse /
        undecided."""
        by_method = self.data.get(setting, {})
        reference = by_method.get(verdict.REFERENCE)
        ref, level = verdict.REFERENCE, f"{LEVEL:.0%}"
        self.lines += [
            f"| method | seeds | {self.roles.score_text} (mean [{level} CI]) "
            f"| Δ vs {ref} (paired, [{level} CI]) | pairs | vs {ref} |",
            "|---|---|---|---|---|---|",
        ]
        for method in methods:
            seeds = by_method.get(method, {})
            finals = {seed: m.get("score") for seed, m in seeds.items()}
            ci = mean_ci(finals.values())
            diff_text, pairs, word = "–", "–", "–"
            if reference is not None and method != verdict.REFERENCE:
                theirs = {seed: m.get("score") for seed, m in reference.items()}
                diff = paired_difference(finals, theirs)
                if diff is not None:
                    diff_text = diff.text(self.roles.score_format, signed=True)
                    pairs, word = str(diff.n), direction(diff)
            self.lines.append(
                f"| {method} | {len(finals)} | {ci.text(self.roles.score_format) if ci else '–'} "
                f"| {diff_text} "
                f"| {pairs} | {word} |"
            )
        self.lines.append("")

    # ------------------------------------------------------------------ sections
    def setting_section(self, setting: tuple, by_method: dict[str, list[Cell]]) -> None:
        bounds = bounds_of(self.plan.suite.rank_configs[setting[0]])
        self.lines += [f"### {setting_title(setting)}", ""]
        self.lines += [f"Client ranks: {self.plan.suite.rank_configs[setting[0]]} (cycled).", ""]
        self.table(by_method, bounds)
        self.stats_table(setting, list(by_method))
        slug = setting_slug(setting)
        accuracy, norm, energy = {}, {}, {}
        for method, cells in by_method.items():
            runs = self.runs_of(cells)
            if not runs:
                continue
            if got := series(runs, lambda r: r.get("server_accuracy"), evaluated=True):
                accuracy[method] = got
            if got := series(runs, lambda r: r.get("norm")):
                norm[method] = got
            if got := series(runs, lambda r: partition_energy(r, bounds)):
                energy[method] = got
        if accuracy:
            path = figures.plot_mean_band(
                accuracy,
                self.plots / f"{slug}_accuracy.png",
                ylabel="server test accuracy",
                title=f"test accuracy vs round — {setting_title(setting)}",
            )
            self.image(path, "accuracy vs round")
        if energy and len({v[0][-1] for v in energy.values()}) == 1:
            path = figures.plot_energy(
                energy,
                bounds,
                self.plots / f"{slug}_energy.png",
                title=f"energy of the global update per rank partition — {setting[0]}",
            )
            self.image(path, "energy per rank partition vs round")
        if norm:
            path = figures.plot_mean_band(
                norm,
                self.plots / f"{slug}_norm.png",
                ylabel="‖ΔW‖_F (over modules)",
                title="norm of the global update (merge mode: of the round's update)",
            )
            self.image(path, "norm of the global update vs round")

    def sensitivity_section(self, grid: str, groups: dict[tuple, dict[str, list[Cell]]]) -> None:
        configs = list(dict.fromkeys(s[0] for s in groups))
        if len(configs) < 2:
            return
        for alpha, fraction in dict.fromkeys((s[1], s[2]) for s in groups):
            alpha_text = "base partition" if alpha is None else f"α = {alpha:g}"
            what = self.roles.score_text
            title = f"{what} vs rank configuration — {alpha_text}, fraction {fraction:g}"
            points: dict[str, dict[str, tuple[float, float]]] = {}
            rows: dict[str, dict[str, str]] = {}
            for (rc, a, f), by_method in groups.items():
                if (a, f) != (alpha, fraction):
                    continue
                for method, cells in by_method.items():
                    metric = self.plan.suite.suite.metric
                    ci = mean_ci([score(r.summary, metric) for r in self.runs_of(cells)])
                    text = ci.text(self.roles.score_format) if ci else "–"
                    rows.setdefault(method, {})[rc] = text
                    if ci is not None:
                        half = 0.0 if np.isnan(ci.half) else ci.half
                        points.setdefault(method, {})[rc] = (ci.mean, half)
            self.lines += [f"### Sensitivity (grid `{grid}`): {title}", ""]
            self.lines += [
                f"Mean [{LEVEL:.0%} CI] over seeds; error bars in the figure: the same CI.",
                "",
            ]
            self.lines += [
                "| method | " + " | ".join(configs) + " |",
                "|---" * (len(configs) + 1) + "|",
            ]
            for method, by_config in rows.items():
                self.lines.append(
                    f"| {method} | " + " | ".join(by_config.get(c, "–") for c in configs) + " |"
                )
            self.lines.append("")
            if points:
                slug = setting_slug((grid, alpha, fraction), prefix="sensitivity_")
                path = figures.plot_sensitivity(
                    points, configs, self.plots / f"{slug}.png", title, what
                )
                self.image(path, f"{what} vs rank configuration")

    def _retention(self, label: str) -> str | None:
        """The predicted retention of a method label's aggregation (`Method.retention`)."""
        return self.plan.suite.method_of(label).retention

    def retention_section(self) -> None:
        """c_i vs measured, for the first heterogeneous setting with a FlexLoRA run."""
        for cell in self.plan.cells:
            ranks = self.plan.suite.rank_configs[cell.rank_config]
            if self._retention(cell.method) != "c_i" or len(set(ranks)) < 2:
                continue
            same = [
                c
                for c in self.plan.cells
                if c.setting == cell.setting and self._retention(c.method) is not None
            ]
            same = list({c.run_id: c for c in same}.values())  # a run shared by grids: once
            measured, predicted = {}, []
            for method in dict.fromkeys(c.method for c in same if c.method == cell.method):
                runs = self.runs_of([c for c in same if c.method == method])
                got = [g for r in runs if (g := retention_series(r)) is not None]
                if got:
                    width = min(m.shape for m, _ in got)
                    measured[method] = np.array([m[: width[0], : width[1]] for m, _ in got])
                    predicted = [p[: width[0], : width[1]] for _, p in got]
            for method in dict.fromkeys(c.method for c in same if c.method != cell.method):
                runs = self.runs_of([c for c in same if c.method == method])
                got = [g[0] for r in runs if (g := retention_series(r)) is not None]
                if got and measured:
                    shape = next(iter(measured.values())).shape[1:]
                    measured[method] = np.array([m[: shape[0], : shape[1]] for m in got])
            if not measured:
                continue
            title = f"retention per direction — {setting_title(cell.setting)}"
            path = figures.plot_retention(
                measured,
                np.mean(predicted, axis=0),
                bounds_of(ranks),
                self.plots / f"retention_{setting_slug(cell.setting)}.png",
                title,
            )
            self.lines += [
                "### Predicted retention c_i vs measured",
                "",
                f"Setting: {setting_title(cell.setting)}. Measured: the "
                "share u_iᵀ ΔW_t v_i / σ_i of direction i of the previous global update that "
                "the next aggregate keeps, averaged over modules (and rounds, seeds on the "
                "left); predicted: c_i = Σ_{r_k ≥ i} p_k of the clients aggregated that round.",
                "",
            ]
            self.image(path, "predicted vs measured retention")
            return

    # ------------------------------------------------------------------ whole report
    def header(self, command: str | None) -> None:
        suite = self.plan.suite.suite
        manifest = self.suite_dir / "suite.json"
        meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
        walls = [run_metrics(r, [1])["wall_seconds"] or 0.0 for r in self.results.values()]
        failed = [k for k, v in meta.get("runs", {}).items() if v.get("status") == "failed"]
        machine = meta.get("machine", {})
        self.lines += [f"## Suite `{suite.name}`", ""]
        if suite.description:
            self.lines += [suite.description.strip(), ""]
        if command:
            self.lines += ["```bash", command, "```", ""]
        self.lines += [
            f"- runs: {len(self.results)} finished of {len(self.plan.configs)} "
            f"({len(self.plan.cells)} grid cells; equal configs share a run)"
            + (f"; failed: {', '.join(failed)}" if failed else ""),
            f"- seeds: {sorted({c.seed for c in self.plan.cells})}",
            f"- compute: {sum(walls) / 3600:.2f} h of rounds summed over runs "
            f"(executor {meta.get('executor', suite.executor)}, "
            f"{meta.get('workers', suite.workers)} at once)",
            f"- machine: {machine.get('cpus', '?')} CPUs, {machine.get('platform', '?')}",
            "",
        ]

    def folded_note(self) -> str:
        """Which of the suite's methods put (part of) the update into the base weights, so
        that the diagnostics do not see all of it (registry-driven)."""
        suite = self.plan.suite
        methods = {label: suite.method_of(label) for label in suite.labels()}
        merged = [label for label, m in methods.items() if m.apply == "merge"]
        residual = [label for label, m in methods.items() if m.apply != "merge" and m.residual]
        text = ""
        if merged:
            text += (
                f"Update merged into the base weights each round ({', '.join(merged)}): "
                "energy, effective rank and norm are those of the last round's update. "
            )
        if residual:
            text += (
                f"Residual (exact average minus the product of the averaged factors) folded "
                f"into the base weights each round ({', '.join(residual)}): energy, effective "
                "rank and norm are those of the kept averaged factors, without the residuals. "
            )
        return text

    def notes(self) -> None:
        self.lines += [
            "Columns: accuracy on the server's held-out test set (final: last round; best: "
            "best round); top-r_min energy: share of ‖ΔW‖²_F in the top r_min singular "
            "directions of the final global update (r_min of the row's rank configuration), "
            "mean over LoRA modules; eff. rank: exp(entropy of σ²/Σσ²), mean over modules; "
            "‖ΔW‖_F: over all modules; bytes/round: sent + received; wall s: sum of the "
            "rounds' wall-clock seconds (training, aggregation, evaluation, checkpoint), "
            "noisy on a shared machine. Mean ± sample std over seeds (seeds: finished/planned). "
            "fedit@r_max / fedit@r_min: every client at the configuration's largest / smallest "
            f"rank. {self.folded_note()}Under each table: "
            f"{self.roles.score_text}'s mean and {LEVEL:.0%} t-interval over seeds (the suite's "
            "metric; a loss is compared as its negative, so higher is better), and each method's "
            "paired difference to raflora (method − raflora over the seeds both finished: "
            "same data split, client ranks, initialisation and sampling) with its CI; "
            "better / worse (the method relative to raflora) when that CI excludes 0, "
            "undecided otherwise.",
            "",
        ]

    def verdict_lines(self) -> list[str]:
        """The claims table (when any claim can be judged) and the headroom table."""
        name = self.plan.suite.suite.name
        lines: list[str] = []
        judged = verdict.claims(self.data, self.roles)
        if any(claim.verdict != "not assessed" for claim in judged):
            lines += [
                f"### Verdict on the seed paper's claims (suite `{name}`)",
                "",
                "Generated from the runs' metrics by `raflora experiment` "
                "(src/raflora/experiments/verdict.py). Each claim is a set of paired "
                f"comparisons (same seed: data split, client ranks, initialisation, sampling), "
                f"each a {LEVEL:.0%} t-interval of the per-seed differences, oriented so that "
                "> 0 supports the claim: reproduced = every CI above 0; not reproduced = some "
                "CI below 0; undecided = otherwise; no correction for multiple comparisons. "
                "Numbers: mean difference [CI] and seeds n, or, for many comparisons, the "
                "counts and the range of mean differences per baseline "
                "(supporting/undecided/contradicting).",
                "",
                "| claim | verdict | what is compared | numbers |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {c.name} | **{c.verdict}** | {c.statement} | {c.numbers} |" for c in judged
            ]
            lines.append("")
        rows = verdict.headroom(self.data, self.roles)
        if rows:
            lines += [
                f"### Headroom check (suite `{name}`): fedit@r_max − fedit@r_min",
                "",
                f"Does the task reward rank? {self.roles.score_text.capitalize()} of the "
                "homogeneous references "
                f"(every client at r_max, or at r_min), mean [{LEVEL:.0%} CI] over seeds, and "
                "their paired difference; headroom = the CI of the difference lies above 0.",
                "",
                "| setting | fedit@r_max | fedit@r_min | r_max − r_min (paired) | pairs "
                "| headroom |",
                "|---|---|---|---|---|---|",
            ]
            fmt = self.roles.score_format
            for row in rows:
                cells = [
                    row.r_max.text(fmt) if row.r_max else "–",
                    row.r_min.text(fmt) if row.r_min else "–",
                    row.diff.text(fmt, signed=True) if row.diff else "–",
                    str(row.diff.n) if row.diff else "0",
                ]
                lines.append(f"| {row.where} | " + " | ".join(cells) + f" | {row.flag} |")
            lines.append("")
        return lines

    def write(self, command: str | None = None) -> Path:
        if self.plots.is_dir():
            shutil.rmtree(self.plots)
        self.lines = []
        self.header(command)
        summary = self.verdict_lines()
        self.lines += summary
        target = self.suite_dir / VERDICT
        if summary:
            target.write_text("\n".join(summary).rstrip() + "\n")
        elif target.is_file():
            target.unlink()
        self.notes()
        for setting, by_method in group_cells(self.plan).items():
            self.setting_section(setting, by_method)
        for grid in self.plan.suite.grid:
            self.sensitivity_section(grid.name, group_cells(self.plan, grid.name))
        self.retention_section()
        path = self.suite_dir / "report.md"
        path.write_text("\n".join(self.lines).rstrip() + "\n")
        return path


def write_report(plan: Plan, suite_dir: Path, command: str | None = None) -> Path:
    """Write ``<suite_dir>/report.md`` and ``plots/`` (and ``verdict.md``: the claims and
    headroom tables alone, when there are any); returns the report's path."""
    return ReportWriter(plan, suite_dir).write(command)


def _after_title(text: str, block: str) -> str:
    """``block`` inserted after the document's first ``# `` title line (at the start if none)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("# "):
            head, tail = "".join(lines[: i + 1]), "".join(lines[i + 1 :]).lstrip("\n")
            return f"{head}\n{block}\n\n{tail}"
    return f"{block}\n\n{text}"


def splice_into(
    document: Path, report: Path, name: str, *, plots: bool = True, top: bool = False
) -> list[Path]:
    """Put ``report`` into ``document`` between ``<!-- BEGIN raflora experiment NAME -->`` and
    ``<!-- END … -->``. Without the markers the block is appended (``top``: inserted after the
    title). With ``plots`` the report's plots are copied to ``img/results_NAME_*.png`` next to
    the document. Returns the copied images."""
    document, report = Path(document), Path(report)
    begin = f"<!-- BEGIN raflora experiment {name} (generated: do not edit) -->"
    end = f"<!-- END raflora experiment {name} -->"
    copied = []
    if plots:
        images = document.parent / "img"
        images.mkdir(parents=True, exist_ok=True)
        for old in images.glob(f"results_{name}_*.png"):
            old.unlink()
        for plot in sorted((report.parent / "plots").glob("*.png")):
            target = images / f"results_{name}_{plot.name}"
            shutil.copyfile(plot, target)
            copied.append(target)
    body = report.read_text().replace("](plots/", f"](img/results_{name}_")
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = document.read_text() if document.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif top:
        text = _after_title(text, block)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    document.write_text(text)
    return copied
