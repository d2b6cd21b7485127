"""The prediction log by its window, through the real writer and the CLI: a log written over several simulated days by
`PredictionLog` is read by `monitor.read_window` touching only the window's partitions (the others are made unreadable,
so a read that opened them would fail), returning exactly the window's rows; `mlops-nb log compact` and
`mlops-nb log prune` keep every row inside retention, in order, once; a log of the old flat layout is still read and
is migrated by compact."""
import datetime
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from conftest import ROOT, run
from mlops_nb.logstore import partitions
from mlops_nb.monitor import read_window
from mlops_nb.predlog import PredictionLog, log_meta, read_prediction_log

START = datetime.datetime(2026, 11, 1, 0, 0)


def write_days(folder, days=4, per_hour=3, every_hours=5):
    "A log of `days` days through the real writer: a batch of `per_hour` records every `every_hours` hours, sealed each day."
    for d in range(days):
        log = PredictionLog(folder, flush_seconds=3600).start(background=False)
        for h in range(0, 24, every_hours):
            meta = log_meta([f"d{d}h{h}"] * per_hour, np.arange(per_hour), "champion", "demo", 1, np.zeros(per_hour, int),
                            np.full((per_hour, 2), 0.5), [0, 1])
            meta["ts"] = np.full(per_hour, np.datetime64(START + datetime.timedelta(days=d, hours=h), "us"))
            log.append({"x": np.arange(per_hour, dtype=float)}, meta)
            log.flush()
        log.close()   # seals the day's segment into its hours' partitions


def test_window_reads_only_its_partitions_and_exactly_its_rows(tmp_path):
    folder = tmp_path / "log"
    write_days(folder)
    everything = read_prediction_log(folder)
    assert len(everything) == 4 * 5 * 3 and not list(folder.glob("segment-*"))
    now = START + datetime.timedelta(days=3, hours=12)
    expected = everything[everything.ts >= pd.Timestamp(now - datetime.timedelta(hours=20))]
    for p in partitions(folder):       # every partition wholly before the window: no longer Parquet
        if pd.Timestamp(p.parent.name[5:] + " " + p.name[5:] + ":00") < pd.Timestamp(now - datetime.timedelta(hours=20)).floor("h"):
            for f in p.glob("part-*.parquet"): f.write_bytes(b"garbage")
    window = read_window(folder, since="20h", now=now.replace(tzinfo=datetime.timezone.utc))
    assert (window.request_id + window.record.astype(str)).tolist() == (expected.request_id + expected.record.astype(str)).tolist()
    last = read_window(folder, last=4)
    assert (last.request_id + last.record.astype(str)).tolist() == (everything.request_id + everything.record.astype(str)).tail(4).tolist()


def test_compact_and_prune_commands_keep_every_row_in_retention_once(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    folder = project / "log"
    write_days(folder)
    flat = read_prediction_log(folder).head(5).assign(request_id=lambda d: "flat-" + d.request_id,    # records of their own, answered
                                                      ts=lambda d: (d.ts + pd.Timedelta(milliseconds=1)).astype("datetime64[us]"))  # a moment apart
    pq.write_table(__import__("pyarrow").Table.from_pandas(flat, preserve_index=False), folder / "part-123-old.parquet")  # the old layout
    before = read_prediction_log(folder)
    assert len(before) == 4 * 5 * 3 + 5
    files = len(list(folder.rglob("part-*.parquet")))
    out = json.loads(run("mlops-nb", "log", "compact", "--dir", "log", cwd=project).stdout)
    assert out["migrated"] == 1 and not list(folder.glob("part-*.parquet"))
    assert len(list(folder.rglob("part-*.parquet"))) < files
    after = read_prediction_log(folder)
    pd.testing.assert_frame_equal(after, before)                 # every row, in order, once
    # keep the days since 2026-11-02 12:00: the one day that ends before that cutoff goes, every row after it stays
    days = (datetime.datetime.now() - (START + datetime.timedelta(days=1, hours=12))).total_seconds() / 86400
    pruned = json.loads(run("mlops-nb", "log", "prune", "--dir", "log", "--keep-days", f"{days:.6f}", cwd=project).stdout)
    assert pruned["deleted_days"] == ["2026-11-01"]
    kept = read_prediction_log(folder)
    pd.testing.assert_frame_equal(kept, before[before.ts >= pd.Timestamp("2026-11-02")].reset_index(drop=True))
    assert pruned["deleted_rows"] == len(before) - len(kept)
    bad = run("mlops-nb", "log", "prune", "--dir", "log", cwd=project, check=False)
    assert bad.returncode != 0 and "--keep-days" in bad.stderr and "Traceback" not in bad.stderr
