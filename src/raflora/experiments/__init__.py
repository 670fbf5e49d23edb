"""Experiment suites: grids of federated runs (methods × rank configurations × α × fraction ×
seeds), executed as resumable runs, summarised in one report (`raflora experiment`).

    suite = load_suite("examples/suite_language.toml")
    state = run_suite(suite, Path("runs"), resume=True, workers=2)
    write_report(state.plan, state.suite_dir)
"""

from raflora.experiments.report import splice_into, write_report
from raflora.experiments.runner import prepare, prepare_report, run_suite
from raflora.experiments.suite import Suite, SuiteError, expand, load_suite, suite_from_dict

__all__ = [
    "Suite",
    "SuiteError",
    "expand",
    "load_suite",
    "prepare",
    "prepare_report",
    "run_suite",
    "splice_into",
    "suite_from_dict",
    "write_report",
]
