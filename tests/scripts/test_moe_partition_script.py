"""scripts/moe_partition.py end to end with --preset smoke shortened (real corpora, the
cached BPE-512 tokenizer, 10 training steps, one seed)."""

import json

import pytest

pytestmark = pytest.mark.slow

from script_entry import script_namespace


def test_smoke_writes_report(tmp_path):
    main = script_namespace("moe_partition")["main"]
    report = main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "10", "--seeds", "1",
                   "--no-progress"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["summary"]) == {"weights", "coact_routed", "coact_dense", "random", "random_all_draws"}
    run = saved["runs"][0]
    assert len(run["ari"]["weights"]) == 2 and len(run["ari"]["random"]) == 10
    assert all(-1 <= v <= 1 for v in run["ari"]["coact_routed"])
    assert report["steps"] == 10
