"""lens.modularity.pruning_study: the verdict and the draw summary by hand, the study's
runs equal independent `selective_pruning` calls with the same settings, and a second
start of the same study loads every run instead of running it."""

import json

import numpy as np
import pytest

from lens.modularity import pruning as M
from lens.modularity import pruning_study as S
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(7)
FORGET = RNG.randint(0, VOCAB, size=(3, 7))  # odd sizes: chunk=8 covers them in one partial chunk
RETAIN = RNG.randint(0, VOCAB, size=(2, 7))
OTHER = RNG.randint(0, VOCAB, size=(3, 7))


def js(x):
    """What a saved run reloads to (JSON: tuples become lists); the same computation on the
    same CPU is deterministic, so equality is exact."""
    return json.loads(json.dumps(x))


def _record(step, forget, retain):
    """A record with top-1 values and 95% intervals (value, (lo, hi)) per corpus."""
    return {"step": step, "neurons_pruned": 10 * step,
            "f": {"top1": forget[0], "top1_ci95": list(forget[1])}, "r": {"top1": retain[0], "top1_ci95": list(retain[1])}}


@pytest.mark.parametrize("after, expected", [
    (((0.25, (0.23, 0.27)), (0.20, (0.17, 0.23))), (True, True, True)),    # forget below, retain inside
    (((0.30, (0.28, 0.32)), (0.20, (0.17, 0.23))), (False, False, True)),  # forget at its lower end: not below
    (((0.10, (0.08, 0.12)), (0.16, (0.14, 0.18))), (False, True, False)),  # retain fell out
    (((0.10, (0.08, 0.12)), (0.24, (0.22, 0.26))), (False, True, False)),  # retain rose out: not "kept"
    (((0.25, (0.23, 0.27)), (0.17, (0.15, 0.19))), (True, True, True)),    # retain at its lower end: inside
])
def test_first_step_selective_by_hand(after, expected):
    records = [_record(0, (0.40, (0.30, 0.50)), (0.20, (0.17, 0.23))), _record(1, *after)]
    v = S.first_step_selective(records, "f", "r")
    assert (v["selective"], v["forget_below_interval"], v["retain_inside_interval"]) == expected
    with pytest.raises(ValueError, match="at least one step"):
        S.first_step_selective(records[:1], "f", "r")


def test_draw_summary_by_hand():
    draws = [[_record(0, (0.4, (0, 1)), (0.2, (0, 1))), _record(1, (0.1, (0, 1)), (0.3, (0, 1)))],
             [_record(0, (0.4, (0, 1)), (0.2, (0, 1))), _record(1, (0.3, (0, 1)), (0.1, (0, 1)))],
             [_record(0, (0.4, (0, 1)), (0.2, (0, 1))), _record(1, (0.2, (0, 1)), (0.2, (0, 1)))]]
    (s0, s1) = S.draw_summary(draws, ["f", "r"])
    assert s0["f"] == {"mean": pytest.approx(0.4), "min": 0.4, "max": 0.4} and s1["neurons_pruned"] == 10
    assert s1["f"] == {"mean": pytest.approx(0.2), "min": 0.1, "max": 0.3}
    assert s1["r"] == {"mean": pytest.approx(0.2), "min": 0.1, "max": 0.3}
    with pytest.raises(ValueError, match="equally long"):
        S.draw_summary([draws[0], draws[1][:1]], ["f"])
    with pytest.raises(ValueError, match="equally long"):
        S.draw_summary([], ["f"])


@pytest.mark.parametrize("bad, match", [(dict(draws=0), "draws"), (dict(retain="code"), "differ"),
                                        (dict(frac=1.5), "neuron_frac"), (dict(steps=0), "steps"),
                                        (dict(compute_dtype="float16"), "compute_dtype"),
                                        (dict(first_draw=-1), "first_draw"), (dict(first_draw=1.0), "first_draw")])
def test_study_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        S.PruningStudy(**{"forget": "code", "retain": "prose", **bad})


def test_study_equals_independent_runs_and_resumes_without_rerunning(tmp_path, monkeypatch):
    _, model, _ = tiny("llama")
    evals = {"code": FORGET, "prose": RETAIN, "docs": OTHER}
    study = S.PruningStudy("code", "prose", frac=0.1, steps=2, draws=2, seed=3)
    samples = []

    def sample(d):
        samples.append(d)
        return OTHER

    result, masks = S.run_pruning_study(model, FORGET, RETAIN, evals, [], study, tmp_path / "runs",
                                        forget_sample=sample, progress=False)
    assert samples == [1]  # draw 0 collects on the forget rows themselves
    # independent runs with the same settings
    ratio, nm, _ = M.selective_pruning(model, FORGET, RETAIN, evals, [], M.PruningConfig(2, "ratio", 0.1, chunk=8))
    assert result["methods"]["ratio"]["records"] == js(ratio) and np.array_equal(masks["ratio"], nm)
    rnd1, _, _ = M.selective_pruning(model, FORGET, RETAIN, evals, [], M.PruningConfig(2, "random", 0.1, seed=4, chunk=8))
    assert result["baselines"]["random"]["draws"][1] == js(rnd1)
    fgt1, _, _ = M.selective_pruning(model, OTHER, RETAIN, evals, [], M.PruningConfig(2, "forget", 0.1, chunk=8))
    assert result["baselines"]["forget"]["draws"][1] == js(fgt1)
    assert result["differential_drop"]["ratio"] == M.differential_drop(js(ratio), "code", "prose")
    assert result["first_step"] == S.first_step_selective(ratio, "code", "prose")
    assert result["tokens_collected"] == {"forget": 21, "retain": 14}
    assert result["tokens_evaluated"] == {"code": 21, "prose": 14, "docs": 21}
    assert result["layer_counts"] == nm.sum(1).tolist() and result["baselines"]["n_draws"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "forget_0.safetensors", "forget_1.safetensors", "random_0.safetensors", "random_1.safetensors",
        "ratio.safetensors"]
    # started again: every run is loaded, none is run
    monkeypatch.setattr(M, "selective_pruning", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rerun")))
    again, masks2 = S.run_pruning_study(model, FORGET, RETAIN, evals, [], study, tmp_path / "runs",
                                        forget_sample=sample, progress=False)
    assert again["baselines"] == result["baselines"] and np.array_equal(masks2["ratio"], masks["ratio"])
    with pytest.raises(ValueError, match="evals must include 'prose'"):
        S.run_pruning_study(model, FORGET, RETAIN, {"code": FORGET}, [], study, tmp_path / "x",
                            forget_sample=sample, progress=False)


SAMPLES = {1: OTHER, 2: FORGET[::-1], 3: OTHER[::-1]}  # the forget-only draws' samples, by draw


def _study(model, folder, **kw):
    evals = {"code": FORGET, "prose": RETAIN, "docs": OTHER}
    study = S.PruningStudy("code", "prose", frac=0.1, steps=1, seed=3, **kw)
    return S.run_pruning_study(model, FORGET, RETAIN, evals, [], study, folder, forget_sample=SAMPLES.__getitem__,
                               progress=False)[0]


def test_a_study_in_parts_merges_into_the_one_study(tmp_path):
    """Draws 0-1 and draw 2 run as two parts (first_draw 0 and 2, their own folders) and
    joined by merge_studies equal the same study run once with 3 draws: every draw, the
    summaries, the differential drops and the verdict, exactly (same code, same CPU)."""
    _, model, _ = tiny("llama")
    whole = js(_study(model, tmp_path / "whole", draws=3))
    a, b = js(_study(model, tmp_path / "a", draws=2)), js(_study(model, tmp_path / "b", draws=1, first_draw=2))
    assert b["baselines"]["draw_ids"] == [2] and sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "forget_2.safetensors", "random_2.safetensors", "ratio.safetensors"]
    assert b["baselines"]["random"]["draws"][0] == whole["baselines"]["random"]["draws"][2]
    merged = js(S.merge_studies([b, a], rel=0.0))  # any order of parts: draws are joined by index
    for k in ("baselines", "differential_drop", "first_step", "layer_counts", "tokens_evaluated"):
        assert merged[k] == whole[k], k
    assert merged["methods"]["random"] == whole["methods"]["random"]
    assert merged["methods"]["forget"] == whole["methods"]["forget"]  # the lowest draw's records
    assert [p["draw_ids"] for p in merged["parts"]] == [[2], [0, 1]]
    # a section saved before draw_ids existed holds draws 0 .. n_draws - 1
    old = {**a, "baselines": {k: v for k, v in a["baselines"].items() if k != "draw_ids"}}
    assert js(S.merge_studies([old, b], rel=0.0))["baselines"] == whole["baselines"]


def test_merge_studies_refuses_parts_of_other_studies(tmp_path):
    _, model, _ = tiny("llama")
    a, b = js(_study(model, tmp_path / "a", draws=2)), js(_study(model, tmp_path / "b", draws=1, first_draw=2))
    with pytest.raises(ValueError, match="draw 0 is in part 0 and in part 1"):
        S.merge_studies([a, a])
    with pytest.raises(ValueError, match="at least two parts"):
        S.merge_studies([a])
    with pytest.raises(ValueError, match="tokens_collected"):
        S.merge_studies([a, {**b, "tokens_collected": {"forget": 7, "retain": 14}}])
    moved = js(b)
    moved["methods"]["ratio"]["records"][1]["code"]["loss"] *= 1 + 1e-6  # beyond the 1e-9 tolerance
    with pytest.raises(ValueError, match="ratio run's records differ"):
        S.merge_studies([a, moved])
    near = js(b)
    near["methods"]["ratio"]["records"][1]["code"]["loss"] *= 1 + 1e-12  # a summation-order difference
    assert S.merge_studies([a, near])["baselines"]["n_draws"] == 3


def test_study_plan_counts_what_the_study_runs():
    """token-forwards by hand from the study's runs (ratio: unpruned eval + per step both
    statistics and an eval; random: per step an eval; forget-only: per step a forget
    collection and an eval), FLOPs = that x forward_flops_per_token counted here by hand,
    bytes = lens.core.plan's forward workload for one chunk."""
    from lens.core import plan as PL

    _, model, _ = tiny("llama")
    c = model.config
    study = S.PruningStudy("code", "prose", frac=0.1, steps=3, draws=4)
    p = S.study_plan(c, study, 7, forget_tokens=21, retain_tokens=14, eval_tokens={"code": 21, "prose": 14, "docs": 9},
                     chunk=2, peak_flops=1e12, utilisation=0.5)
    E = 21 + 14 + 9
    assert p["token_forwards"] == {"ratio": E + 3 * (21 + 14 + E), "random": 4 * 3 * E, "forget": 4 * 3 * (21 + E),
                                   "total": E + 3 * (35 + E) + 12 * E + 12 * (21 + E)}
    q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    by_hand = 2 * (c.n_layers * (c.d_model * q * 2 + c.d_model * kv * 2 + 3 * c.d_model * c.d_mlp)
                   + c.d_model * c.vocab_size) + 2 * c.n_layers * 7 * q
    assert c.gated_mlp and p["flops_per_token"] == by_hand == PL.forward_flops_per_token(c, 7)
    assert p["flops"] == by_hand * p["token_forwards"]["total"]
    assert p["hours"]["gpu"] == pytest.approx(p["flops"] / 5e11 / 3600, rel=1e-12)
    assert p["hours"]["cpu"] == pytest.approx(p["flops"] / S.CPU_FLOPS_PER_CPU_S / 3600, rel=1e-12)
    assert p["bytes_per_chunk"]["total"] == PL.plan(c, {"data": 1, "model": 1}, "forward", batch=2, seq=7).total
    assert S.plan_lines(p)[0].startswith(f"Plan (selective pruning): {p['token_forwards']['total']:,} token-forwards")
    for kw, match in ((dict(seq=0), "seq"), (dict(eval_tokens={"code": 2.5}), r"eval_tokens\[code\]"),
                      (dict(utilisation=1.5), "utilisation")):
        args = {**dict(seq=7, forget_tokens=21, retain_tokens=14, eval_tokens={"code": 21}), **kw}
        with pytest.raises(ValueError, match=match):
            S.study_plan(c, study, **args)


def test_progress_prints_every_step_of_a_multi_step_run(tmp_path, capsys):
    _, model, _ = tiny("llama")
    study = S.PruningStudy("code", "prose", frac=0.1, steps=2, draws=1)
    S.run_pruning_study(model, FORGET, RETAIN, {"code": FORGET, "prose": RETAIN}, [], study, tmp_path,
                        forget_sample=lambda d: OTHER, progress=True)
    out = capsys.readouterr().out
    for name in ("ratio", "random_0", "forget_0"):
        assert f"{name} (running):" in out and f"  {name}: " in out
    assert "ratio (running)" in out and "step 1:" in out and "step 2:" in out
