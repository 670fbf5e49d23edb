"""`raflora experiment`: suite validation and grid expansion, resumable execution, the report,
the docs splice and the vision pretraining, with the tiny suite run end to end on a tiny BERT.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from typer.testing import CliRunner

from helpers.runs import is_png, without_timing
from raflora.cli import app
from raflora.experiments import SuiteError, expand, load_suite, splice_into, suite_from_dict
from raflora.experiments.report import COLUMNS, cell_text
from raflora.experiments.results import mean_std, rebin
from raflora.experiments.runner import run_status

pytestmark = pytest.mark.usefixtures("single_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
runner = CliRunner()


def suite_dict(**changes) -> dict:
    data = {
        "suite": {"name": "t", "seeds": [0, 1]},
        "base": {"clients": {"num_clients": 4}, "federation": {"rounds": 2}},
        "rank_configs": {"uniform": [2, 4, 8, 16], "skewed": [2, 2, 2, 16], "small": [2, 2, 4, 4]},
        "grid": [
            {
                "name": "g",
                "methods": ["fedit@r_max", "flexlora", "flora", "raflora"],
                "rank_configs": ["uniform", "skewed"],
                "alphas": [0.1, 1.0],
            }
        ],
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


# --------------------------------------------------------------------------- suite files


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("suite_*.toml")), ids=lambda p: p.name)
def test_shipped_suites_expand_into_valid_runs(path: Path) -> None:
    suite = load_suite(path)
    if suite.pretrain is not None:  # the pretrained folder does not exist yet
        base = {**suite.base, "model": {**suite.base["model"], "path": suite.pretrain.model}}
        suite = suite.model_copy(update={"base": base})
    plan = expand(suite, Path("runs") / suite.suite.name / "runs")
    assert plan.configs and len(plan.cells) >= len(plan.configs)
    methods = {c.method for c in plan.cells}
    assert {"flexlora", "raflora"} <= methods or {"fedit@r_max", "fedit@r_min"} == methods


def test_expansion_sets_each_cell_and_shares_equal_runs() -> None:
    # Prepare
    suite = suite_from_dict(suite_dict())
    # Execute
    plan = expand(suite, Path("/tmp/out/runs"))
    # Assert: 4 methods × 2 rank configs × 2 α × 2 seeds cells
    assert len(plan.cells) == 32
    # fedit@r_max has ranks [16] under both rank configurations: one run per (α, seed)
    fedit = {c.run_id for c in plan.cells if c.method == "fedit@r_max"}
    assert fedit == {f"fedit-r_max_r16_a{a}_f1_s{s}" for a in ("0.1", "1") for s in (0, 1)}
    assert len(plan.configs) == 32 - 4
    config = plan.configs["raflora_skewed_a0.1_f1_s1"]
    assert config.clients.ranks == [2, 2, 2, 16]
    assert (config.data.partition, config.data.dirichlet_alpha) == ("dirichlet", 0.1)
    assert (config.run.seed, config.run.name, config.run.out_dir) == (
        1,
        config.run.name,
        "/tmp/out/runs",
    )
    assert config.federation.method == "raflora" and config.federation.apply_mode == "adapter"
    assert plan.configs["flora_uniform_a1_f1_s0"].federation.apply == "merge"
    assert plan.configs["fedit-r_max_r16_a1_f1_s0"].clients.ranks == [16]


def test_variants_fractions_and_grid_overrides() -> None:
    data = suite_dict(
        methods={"fm": {"method": "flexlora", "ranks": "min", "set": ["federation.split=sqrt"]}},
        grid=[
            {"name": "a", "methods": ["fm"], "rank_configs": ["small"], "fractions": [0.5]},
            {
                "name": "b",
                "methods": ["fm"],
                "rank_configs": ["small"],
                "fractions": [0.5],
                "seeds": [0],
                "set": ["federation.rounds=3"],
            },
        ],
    )
    plan = expand(suite_from_dict(data), Path("r"))
    config = plan.configs["fm_r2_base_f0.5_s0"]
    assert config.clients.ranks == [2] and config.federation.split == "sqrt"
    assert config.federation.fraction_train == 0.5 and config.data.partition == "dirichlet"
    # same name, other config (3 rounds): its own run, named after its grid
    assert plan.configs["fm_r2_base_f0.5_s0_b"].federation.rounds == 3
    assert len(plan.configs) == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"suite__colour": "red"}, "suite.colour: unknown key"),
        ({"suite__name": "a b"}, "suite.name: String should match pattern"),
        ({"rank_configs": {"u": [2, 0]}}, "rank_configs: Value error, u: needs at least one"),
        ({"grid": []}, "grid: List should have at least 1 item"),
        ({"methods": {"x": {"method": "nope"}}}, "methods.x.method: unknown method 'nope'"),
        (
            {"grid": [{"methods": ["nope"], "rank_configs": ["uniform"]}]},
            "grid[0].methods: 'nope': method: unknown method 'nope'",
        ),
        (
            {"grid": [{"methods": ["raflora"], "rank_configs": ["zig"]}]},
            "grid[0].rank_configs: unknown 'zig'; known: uniform, skewed, small",
        ),
        (
            {"grid": [{"methods": ["raflora"], "rank_configs": ["uniform"], "fractions": [0]}]},
            "grid[0].fractions[0]: Input should be greater than 0",
        ),
        (
            {"grid": [{"methods": ["fedit"], "rank_configs": ["uniform"]}]},
            "grid 'grid', fedit / uniform / base / f1 / s0: config: federation.method: fedit needs",
        ),
        ({"base": {"federation": {"rounds": 0}}}, "federation.rounds: Input should be greater"),
    ],
)
def test_bad_suites_fail_with_one_line_per_problem(changes: dict, message: str) -> None:
    with pytest.raises(SuiteError) as error:
        expand(suite_from_dict(suite_dict(**changes)), Path("r"))
    assert message.replace("Value error, ", "") in str(error.value)
    assert all(line.count(":") >= 1 for line in str(error.value).splitlines())


def test_load_suite_reports_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[suite\n")
    with pytest.raises(SuiteError, match="not valid TOML"):
        load_suite(tmp_path / "bad.toml")


# --------------------------------------------------------------------------- report pieces


def test_rebin_mean_std_and_cells() -> None:
    e = [0.5, 0.2, 0.1, 0.1, 0.05]  # σ²/Σσ², 0.05 of the energy lies beyond the list
    np.testing.assert_allclose(rebin(e, [1, 2, 4]), [0.5, 0.2, 0.2, 0.1])
    np.testing.assert_allclose(rebin(e, [2]), [0.7, 0.3])
    assert rebin([0.0, 0.0], [1, 2]) == [0.0, 0.0, 0.0]
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2)), 2)
    assert mean_std([None]) is None
    assert cell_text((0.81234, 0.0, 1), ".3f") == "0.812"
    assert cell_text((0.8, 0.01, 2), ".3f") == "0.800 ± 0.010"
    assert cell_text(None, ".3f") == "–"


def test_two_grids_with_other_runs_in_one_table_cell_are_refused() -> None:
    from raflora.experiments.results import RunResult, seed_metrics

    grid = {"methods": ["raflora"], "rank_configs": ["uniform"], "seeds": [0]}
    data = suite_dict(grid=[grid, {**grid, "name": "b", "set": ["train.lr=0.1"]}])
    plan = expand(suite_from_dict(data), Path("r"))
    results = {run: RunResult(run, {"final_accuracy": 0.5}, []) for run in plan.configs}
    with pytest.raises(SuiteError, match=r"two different runs .* \(raflora, uniform, seed 0\)"):
        seed_metrics(plan, results)
    one_grid = seed_metrics(plan, results, grid="b")  # within one grid: no conflict
    assert one_grid[("uniform", None, 1.0)]["raflora"][0]["final_accuracy"] == 0.5


def test_splice_into_replaces_only_the_generated_block(tmp_path: Path) -> None:
    suite_dir = tmp_path / "suite"
    (suite_dir / "plots").mkdir(parents=True)
    (suite_dir / "plots" / "a.png").write_bytes(b"png")
    report = suite_dir / "report.md"
    report.write_text("## Suite\n\n| x |\n\n![a](plots/a.png)\n")
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nprose before\n")
    # Execute: append, then replace in place
    splice_into(doc, report, "lang")
    report.write_text("## Suite v2\n\n![a](plots/a.png)\n")
    doc.write_text(doc.read_text() + "\nprose after\n")
    splice_into(doc, report, "lang")
    # Assert
    text = doc.read_text()
    assert text.startswith("# Results\n\nprose before\n") and text.endswith("prose after\n")
    assert "Suite v2" in text and "| x |" not in text
    assert "](img/results_lang_a.png)" in text
    assert (doc.parent / "img" / "results_lang_a.png").read_bytes() == b"png"


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_suite(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """examples/suite_tiny.toml on the tiny BERT with fewer examples, run once via the CLI."""
    data = tomllib.loads((EXAMPLES / "suite_tiny.toml").read_text())
    data["base"]["model"]["path"] = str(tiny_bert_dir)
    data["base"]["data"].update(train_size=90, test_size=60)
    data["base"]["train"]["lr"] = 0.03  # the tiny BERT moves enough in 2 rounds to rank methods
    folder = tmp_path_factory.mktemp("suite")
    path = folder / "suite_tiny.toml"
    path.write_text(tomli_w.dumps(data))
    out = folder / "out"
    result = runner.invoke(app, ["experiment", str(path), "--out", str(out)])
    return {"path": path, "out": out, "dir": out / "tiny", "result": result, "data": data}


def test_tiny_suite_runs_every_cell_and_writes_the_report(tiny_suite: dict) -> None:
    result, suite_dir = tiny_suite["result"], tiny_suite["dir"]
    assert result.exit_code == 0, result.output
    manifest = json.loads((suite_dir / "suite.json").read_text())
    assert len(manifest["cells"]) == 8 and len(manifest["runs"]) == 6
    assert {v["status"] for v in manifest["runs"].values()} == {"finished"}
    for run_id in manifest["runs"]:
        run = suite_dir / "runs" / run_id
        assert (run / "run.json").is_file() and (run / "adapter").is_dir()
        history = json.loads((run / "metrics.json").read_text())
        assert [r["round"] for r in history] == [0, 1, 2]
        last = history[-1]
        assert last["predicted_retention"] and "energy_spectrum" in next(
            iter(last["per_module"].values())
        )
    report = (suite_dir / "report.md").read_text()
    titles = [title for _, title, _ in COLUMNS]
    header = "| method | seeds | " + " | ".join(titles) + " |"
    assert report.count(header) == 2  # one table per rank configuration
    rows = [
        line
        for line in report.splitlines()
        if re.match(r"\| (flexlora|raflora) \| ([12])/\2 \|", line)
    ]
    assert len(rows) == 4  # uniform: 2 seeds each, skewed_small: seed 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 2 + len(COLUMNS)
        final, energy = (float(cells[i].split(" ± ")[0]) for i in (2, 4))  # mean (± std)
        assert 0 <= final <= 1 and 0 <= energy <= 1  # final acc, top-r_min
        assert "–" not in cells
    assert "Sensitivity" in report and "Predicted retention" in report
    images = re.findall(r"!\[[^]]*\]\((plots/[^)]+)\)", report)
    assert len(images) == 2 * 3 + 1 + 1  # per setting: accuracy, energy, norm; sensitivity; c_i
    for image in images:
        assert is_png(suite_dir / image)


T_975_1 = 12.7062047  # Student's t, 97.5 % quantile, 1 degree of freedom (printed tables)


def _interval(text: str) -> tuple[float, float, float]:
    """``0.512 [0.400, 0.624]`` (signs allowed) → (mean, lo, hi)."""
    mean, lo, hi = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", text.strip()).groups()
    return float(mean), float(lo), float(hi)


def test_tiny_suite_statistics_match_a_hand_computation(tiny_suite: dict) -> None:
    # Prepare: the final accuracies of the 2 seeds, read from the runs themselves
    suite_dir = tiny_suite["dir"]
    final = {
        (method, seed): json.loads(
            (suite_dir / "runs" / f"{method}_uniform_a1_f1_s{seed}" / "run.json").read_text()
        )["final_accuracy"]
        for method in ("flexlora", "raflora")
        for seed in (0, 1)
    }
    report = (suite_dir / "report.md").read_text()
    uniform = report.split("### uniform")[1].split("\n### ")[0]
    rows = {
        cells[0]: cells
        for line in uniform.splitlines()
        if line.startswith("| ") and "[" in line
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    # Execute: by hand. Two values: mean (a+b)/2, sample std |a−b|/√2, half-width t·std/√2
    for method in ("flexlora", "raflora"):
        a, b = final[(method, 0)], final[(method, 1)]
        mean, half = (a + b) / 2, T_975_1 * abs(a - b) / 2
        assert rows[method][1] == "2"
        got = _interval(rows[method][2])
        assert got == pytest.approx((mean, mean - half, mean + half), abs=6e-4), method
    d0 = final[("flexlora", 0)] - final[("raflora", 0)]
    d1 = final[("flexlora", 1)] - final[("raflora", 1)]
    mean, half = (d0 + d1) / 2, T_975_1 * abs(d0 - d1) / 2
    # Assert: flexlora's paired difference to raflora, its pair count and its word
    flex = rows["flexlora"]
    assert _interval(flex[3]) == pytest.approx((mean, mean - half, mean + half), abs=6e-4)
    assert flex[4] == "2"
    word = "better" if mean - half > 0 else "worse" if mean + half < 0 else "undecided"
    assert flex[5] == word
    assert rows["raflora"][3:] == ["–", "–", "–"]
    # the verdict compares the same pairs: accuracy is raflora − flexlora
    verdict = (suite_dir / "verdict.md").read_text()
    assert verdict.strip() in report  # verdict.md is the report's opening tables alone
    accuracy = next(line for line in verdict.splitlines() if line.startswith("| accuracy |"))
    r0 = final[("raflora", 0)] - final[("flexlora", 0)]
    r1 = final[("raflora", 1)] - final[("flexlora", 1)]
    back = (r0 + r1) / 2
    assert f"{back:+.3f} [{back - half:+.3f}, {back + half:+.3f}], n=2" in accuracy
    expected = {"better": "not reproduced", "worse": "reproduced"}.get(word, "undecided")
    assert f"**{expected}**" in accuracy
    assert "| participation | **not assessed** |" in verdict  # one fraction only
    # collapse: flexlora − raflora top-2 energy share of the last round, by hand from metrics.json
    energy = {}
    for method in ("flexlora", "raflora"):
        for seed in (0, 1):
            run = suite_dir / "runs" / f"{method}_uniform_a1_f1_s{seed}"
            last = json.loads((run / "metrics.json").read_text())[-1]
            shares = [sum(m["energy_spectrum"][:2]) for m in last["per_module"].values()]
            energy[(method, seed)] = sum(shares) / len(shares)
    e0 = energy[("flexlora", 0)] - energy[("raflora", 0)]
    e1 = energy[("flexlora", 1)] - energy[("raflora", 1)]
    mean, half = (e0 + e1) / 2, T_975_1 * abs(e0 - e1) / 2
    assert e0 != e1  # a real interval, not a degenerate one
    collapse = next(line for line in verdict.splitlines() if line.startswith("| collapse |"))
    numbers = re.search(r"flexlora \(uniform, α 1, f 1\): (\S+ \[\S+, \S+\]), n=2", collapse)
    assert numbers is not None, collapse
    got = _interval(numbers.group(1))
    assert got == pytest.approx((mean, mean - half, mean + half), abs=6e-4)


def test_tiny_suite_skips_finished_runs_and_resumes_an_interrupted_one(tiny_suite: dict) -> None:
    # Prepare: "interrupt" one run after round 1: no run.json, no round-2 checkpoint
    path, out, suite_dir = tiny_suite["path"], tiny_suite["out"], tiny_suite["dir"]
    run = suite_dir / "runs" / "raflora_uniform_a1_f1_s0"
    before = json.loads((run / "metrics.json").read_text())
    (run / "run.json").unlink()
    shutil.rmtree(run / "checkpoints" / "round_002")
    # Execute
    again = runner.invoke(app, ["experiment", str(path), "--out", str(out)])
    resumed = runner.invoke(app, ["experiment", str(path), "--out", str(out), "--resume"])
    # Assert
    assert again.exit_code == 2 and "pass --resume" in again.output
    assert resumed.exit_code == 0, resumed.output
    assert "5 finished, 1 to run" in resumed.output.replace("\n", " ")
    after = json.loads((run / "metrics.json").read_text())
    assert without_timing(after) == without_timing(before)  # the engine's resume is exact


def test_finished_run_with_another_config_is_an_error(tiny_suite: dict, tmp_path: Path) -> None:
    from raflora.config import load_config

    run = tiny_suite["dir"] / "runs" / "flexlora_uniform_a1_f1_s0"
    config = load_config(run / "config.toml")
    assert run_status(run, config) == "finished"
    longer = load_config(run / "config.toml", ["federation.rounds=3"])
    assert run_status(run, longer) == "partial"  # more rounds: resumed to the new length
    other = load_config(run / "config.toml", ["train.lr=0.1"])
    with pytest.raises(SuiteError, match=r"different config \(train.lr\)"):
        run_status(run, other)
    assert run_status(tmp_path / "absent", config) == "new"


def test_dry_run_and_report_only(tiny_suite: dict) -> None:
    path, out = tiny_suite["path"], tiny_suite["out"]
    listed = runner.invoke(app, ["experiment", str(path), "--out", str(out), "--dry-run"])
    assert listed.exit_code == 0 and "8 cells, 6 runs" in listed.output
    doc = out / "results.md"
    doc.write_text("# Results\n\nprose\n")
    rewritten = runner.invoke(
        app, ["experiment", str(path), "--out", str(out), "--report-only", "--docs", str(doc)]
    )
    assert rewritten.exit_code == 0, rewritten.output
    assert (tiny_suite["dir"] / "report.md").is_file()
    # the document opens with the verdict; the whole report follows the prose
    text = doc.read_text()
    assert text.startswith(
        "# Results\n\n<!-- BEGIN raflora experiment verdict-tiny (generated: do not edit) -->\n"
        "### Verdict on the seed paper's claims (suite `tiny`)"
    )
    assert text.index("prose") < text.index("<!-- BEGIN raflora experiment tiny ")
    assert not list((out / "img").glob("results_verdict-tiny_*"))


def test_report_notes_name_the_methods_whose_update_goes_into_the_base(tmp_path: Path) -> None:
    """From the registry: merge-mode methods (flora, florist) and residual folding (fedex)."""
    from types import SimpleNamespace

    from raflora.experiments.report import ReportWriter

    def note(methods: list[str]) -> str:
        data = suite_dict()
        data["grid"][0]["methods"] = methods
        plan = expand(suite_from_dict(data), tmp_path / "runs")
        return ReportWriter.folded_note(SimpleNamespace(plan=plan))  # type: ignore[arg-type]

    assert note(["raflora", "flexlora"]) == ""
    both = note(["raflora", "flora", "fedex", "florist"])
    assert "each round (flora, florist): energy" in both
    assert "each round (fedex): energy" in both and "without the residuals" in both


def test_report_only_without_finished_runs_says_so(tiny_suite: dict, tmp_path: Path) -> None:
    empty = tmp_path / "elsewhere"
    result = runner.invoke(
        app, ["experiment", str(tiny_suite["path"]), "--out", str(empty), "--report-only"]
    )
    assert result.exit_code == 2
    assert "no finished run of suite 'tiny'" in result.output.replace("\n", " ")
    assert not (empty / "tiny" / "report.md").exists()


def test_bad_suite_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(suite_dict(suite__workers=0)))
    result = runner.invoke(app, ["experiment", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "suite.workers: Input should be greater than or equal to 1" in result.output


# --------------------------------------------------------------------------- vision pretraining


def test_pretraining_never_sees_a_test_image_and_is_reused(tiny_vit_dir: Path, tmp_path: Path):
    from raflora.experiments.pretrain import _key, pretrain, pretraining_examples
    from raflora.experiments.suite import PretrainSection
    from raflora.training import load_task_data

    spec = PretrainSection(model=str(tiny_vit_dir), labels=[0, 1, 2], steps=2, batch_size=8)
    train, held_out = pretraining_examples(spec, exclude_test_of=[0, 1])
    tests = set()
    for seed in (0, 1):
        tests |= {
            _key(ex)
            for ex in load_task_data("mnist5k", task="image-classification", seed=seed).test
        }
    assert train and {ex.label for ex in train} == {0, 1, 2}
    assert not tests & {_key(ex) for ex in train}
    assert {_key(ex) for ex in held_out} <= tests
    folder = pretrain(spec, tmp_path / "pre", exclude_test_of=[0, 1])
    info = json.loads((folder / "pretrain.json").read_text())
    assert info["train_examples"] == len(train) and 0 <= info["held_out_accuracy"] <= 1
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrain(spec, tmp_path / "pre", exclude_test_of=[0, 1]) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        pretrain(spec.model_copy(update={"steps": 3}), folder, exclude_test_of=[0, 1])


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_inprocess_executor_matches_the_ray_simulation(tiny_bert_dir: Path, tmp_path: Path):
    from helpers.runs import tiny_config
    from raflora.experiments.inprocess import run_inprocess
    from raflora.federation.simulation import run_federated

    config = tiny_config(tiny_bert_dir, "federation.fraction_train=0.67")
    run_federated(config, tmp_path / "ray")
    run_inprocess(config, tmp_path / "inprocess")
    ray = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    local = json.loads((tmp_path / "inprocess" / "metrics.json").read_text())
    assert without_timing(local) == without_timing(ray)


@pytest.mark.slow
def test_two_workers_give_the_same_runs_as_one(tiny_suite: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["experiment", str(tiny_suite["path"]), "--out", str(out), "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    for run in (tiny_suite["dir"] / "runs").iterdir():
        one = json.loads((run / "metrics.json").read_text())
        two = json.loads((out / "tiny" / "runs" / run.name / "metrics.json").read_text())
        assert without_timing(two) == without_timing(one)
