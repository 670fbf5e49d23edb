"""The one per-round record: JSON, CSV columns and progress line all come from RoundRecord."""

from __future__ import annotations

import csv
import json

from raflora.federation.outputs import write_metrics
from raflora.federation.progress import LogReporter
from raflora.federation.record import CSV_COLUMNS, RoundRecord, describe
from raflora.federation.strategy import RoundLog


def a_round() -> RoundLog:
    log = RoundLog(round=3, sampled=[0, 1, 2], ok=[0, 2], failed={1: "timeout"})
    log.train_loss, log.bytes_sent, log.bytes_received = 0.25, 1000, 600
    log.diagnostics = {
        "top_rmin_energy": 0.5,
        "effective_rank": 3.0,
        "partition_energy": [0.5, 0.3, 0.2],
        "per_module": {"q": {"norm": 1.0}},
    }
    log.client_eval = {"val-accuracy": 0.75}
    return log


def test_record_fields_come_from_the_round_log_the_diagnostics_and_the_server() -> None:
    record = RoundRecord.of(a_round(), {"accuracy": 0.8, "loss": 0.4}, seconds=2.5).to_dict()
    assert (record["round"], record["sampled"], record["ok"], record["failed"]) == (3, 3, 2, 1)
    assert record["failures"] == {"1": "timeout"} and record["clients"] == [0, 2]
    assert record["server_accuracy"] == 0.8 and record["client_val_accuracy"] == 0.75
    assert record["top_rmin_energy"] == 0.5 and record["stable_rank"] is None
    assert record["partition_energy"] == [0.5, 0.3, 0.2]
    assert record["per_module"] == {"q": {"norm": 1.0}}
    json.dumps(record, allow_nan=False)  # standard JSON
    unevaluated = RoundRecord.of(RoundLog(round=0), None, 0.0).to_dict()
    assert unevaluated["train_loss"] is None and unevaluated["server_accuracy"] is None


def test_csv_columns_are_the_scalar_fields_then_the_partition_energies(tmp_path) -> None:
    record = RoundRecord.of(a_round(), {"accuracy": 0.8}, seconds=2.5).to_dict()
    assert CSV_COLUMNS[:3] == ("round", "sampled", "ok") and "per_module" not in CSV_COLUMNS
    assert "partition_energy" not in CSV_COLUMNS and "bytes_sent" in CSV_COLUMNS
    write_metrics(tmp_path, [record], bounds=[2, 4])
    with (tmp_path / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert list(row)[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert len(row) == len(CSV_COLUMNS) + 3  # energy per partition (1-2, 3-4) and the rest
    assert float(row["server_accuracy"]) == 0.8
    assert json.loads((tmp_path / "metrics.json").read_text()) == [record]


def test_progress_line_reads_the_record(caplog) -> None:
    record = RoundRecord.of(a_round(), {"accuracy": 0.8}, seconds=1.0).to_dict()
    assert describe(record) == "loss 0.250  acc 0.800  top-r_min energy 0.50"
    with caplog.at_level("INFO", logger="raflora"):
        LogReporter().round_done(record)
    assert "round 3 done: loss 0.250" in caplog.text
