"""scripts/modularity_report.py --merge: a selective-pruning study run in two parts
(`--first-draw`) joined into one report, read back from the written report.json and
checked against the study run once; the CLI refuses what is not one study."""

import json

import numpy as np
import pytest

from lens.modularity import pruning_study as S
from lens_tiny import VOCAB, tiny
from script_entry import run_cli, script_namespace

RNG = np.random.RandomState(11)
CODE, PROSE, DOCS = (RNG.randint(0, VOCAB, size=(3, 6)) for _ in range(3))


def _report(model, folder, draws, first_draw=0):
    """A scripts/modularity.py report of the selective-pruning section only, as the script
    writes it (args from its parser)."""
    args = script_namespace("modularity")["parse_args"](
        ["--out", str(folder), "--preset", "smoke", "--sections", "selective_pruning", "--prune-steps", "1",
         "--random-draws", str(draws), "--first-draw", str(first_draw)])
    study = S.PruningStudy("python-code", "shakespeare", frac=0.1, steps=1, draws=draws, first_draw=first_draw)
    evals = {"python-code": CODE, "shakespeare": PROSE, "python-docs": DOCS}
    section, _ = S.run_pruning_study(model, CODE, PROSE, evals, [], study, folder / "runs",
                                     forget_sample=lambda d: np.roll(DOCS, d, axis=1), progress=False)
    section |= {"also_evaluated": ["python-docs"], "reload_max_abs_logit_diff": 0.0}  # the script's additions
    return json.loads(json.dumps({"preset": "smoke", "args": vars(args), "models": ["tiny"],
                                  "selective_pruning": {"tiny": section}, "steering": {}, "moefication": {},
                                  "contextual_sparsity": {}, "fit_sweep": {}, "seconds": {"total": 1.0}}))


def test_merge_cli_joins_the_parts_into_the_one_study(tmp_path):
    _, model, _ = tiny("llama")
    whole = _report(model, tmp_path / "whole", 3)["selective_pruning"]["tiny"]
    for name, draws, first in (("a", 1, 0), ("b", 2, 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(_report(model, tmp_path / name, draws, first)))
    done = run_cli("modularity_report", [tmp_path / "ab", "--merge", tmp_path / "a", "--merge", tmp_path / "b"])
    assert done.returncode == 0, done.stderr
    merged = json.loads((tmp_path / "ab" / "report.json").read_text())
    sp = merged["selective_pruning"]["tiny"]
    for k in ("baselines", "differential_drop", "first_step"):
        assert sp[k] == whole[k], k  # same code, same CPU: exact
    assert merged["args"]["random_draws"] == 3 and sp["baselines"]["draw_ids"] == [0, 1, 2]
    assert merged["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    text = (tmp_path / "ab" / "report.md").read_text()
    assert "baselines (3 draws each)" in text and "Joined from 2 parts (draws [0], [1, 2])" in text
    # not one study: overlapping draws, one folder, a part with another section
    bad = run_cli("modularity_report", [tmp_path / "x", "--merge", tmp_path / "a", "--merge", tmp_path / "a"])
    assert bad.returncode == 2 and "draw 0 is in part 0 and in part 1" in bad.stderr
    bad = run_cli("modularity_report", [tmp_path / "x", "--merge", tmp_path / "a"])
    assert bad.returncode == 2 and "at least two" in bad.stderr
    bad = run_cli("modularity_report", [tmp_path / "x", "--merge", tmp_path / "a", "--merge", tmp_path / "nowhere"])
    assert bad.returncode == 2 and "no report.json in" in bad.stderr
    other = json.loads((tmp_path / "b" / "report.json").read_text()) | {"moefication": {"tiny": {}}, "steering": {"t": 1}}
    with pytest.raises(ValueError, match="only selective-pruning reports merge"):
        script_namespace("modularity_report")["merge_reports"]([json.loads((tmp_path / "a" / "report.json").read_text()), other])
    assert not (tmp_path / "x").exists()
