"""lens.readout.dla: the parts sum to the final residual and, through the frozen final-norm divisor,
to the model's own logit difference for every family (LayerNorm, RMSNorm, NeoX's parallel
residual, Gemma's sandwich norms), jitted and vmapped over K = 3 prompts; per-head parts
against a numpy computation from the weights; exact Shapley against brute force over all
orders in numpy; with the divisor frozen Shapley equals the frozen DLA; sampled Shapley
within its error of the exact values and complete."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens
from lens.readout import dla
from lens_tiny import tiny

FAMILIES = ["llama", "gpt2", "neox", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_sum_to_the_logit_difference_for_every_family(family):
    _, model, _ = tiny(family)
    toks = np.random.default_rng(0).integers(0, 61, (3, 7)).astype(np.int32)
    target, base = 5, 17

    @jax.jit
    def run(t):
        parts = dla.residual_parts(model, t)
        u, bu = dla.logit_direction(model, target, base)
        att = jax.vmap(lambda p: dla.frozen_dla(model, p, u, bu), in_axes=1)(parts)  # every position
        return parts, att

    parts, att = jax.vmap(run)(toks)
    names = dla.part_names(model.config)
    assert parts.shape == (3, len(names), 7, model.config.d_model)
    logits, cache = lens.run_with_cache(model, toks)
    # the parts rebuild the final residual (captured independently by the forward)
    np.testing.assert_allclose(np.asarray(parts.sum(1)), np.asarray(cache.final_norm_in), atol=2e-4, rtol=1e-5)
    pre = np.asarray(dla.pre_softcap_logits(model, logits))
    want = pre[..., target] - pre[..., base]
    got = np.asarray(att.parts.sum(-1) + att.constant)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(att.total), want, atol=2e-4, rtol=1e-5)
    assert np.abs(np.asarray(att.parts)).max() > 0.01  # not vacuous


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_head_parts_against_numpy_from_the_weights(family):
    """Head h of layer 1: z_h W_O[h] (Gemma: through the post-attention norm's gain over its
    actual divisor), from captured z and the weights in float64."""
    _, model, _ = tiny(family)
    toks = np.arange(6, dtype=np.int32) * 7 % 61
    parts = np.asarray(dla.residual_parts(model, toks))
    names = dla.part_names(model.config)
    _, cache = lens.run_with_cache(model, toks)
    z = np.asarray(cache.head_z[1], np.float64)  # [seq, heads, d_head]
    w_o = np.asarray(model.blocks.W_O[1], np.float64)
    writes = np.einsum("shk,hkd->shd", z, w_o)
    if model.config.sandwich_norms:
        raw = writes.sum(1)
        s = np.sqrt((raw ** 2).mean(-1) + model.config.norm_eps)
        writes = writes / s[:, None, None] * np.asarray(model.blocks.post_attn_w[1], np.float64)
    for h in range(model.config.n_heads):
        np.testing.assert_allclose(parts[names.index(f"L1H{h}")], writes[:, h], atol=1e-5, rtol=1e-5)
    mlp = np.asarray(cache.mlp_out[1])
    np.testing.assert_allclose(parts[names.index("L1.mlp")], mlp, atol=1e-6)


def np_norm_logit(model, x, u, bu):
    c = model.config
    x = np.asarray(x, np.float64)
    if c.norm_kind == "layer":
        x = x - x.mean()
    y = x / np.sqrt((x * x).mean() + c.norm_eps) * np.asarray(model.final_norm_w, np.float64)
    if model.final_norm_b is not None:
        y = y + np.asarray(model.final_norm_b, np.float64)
    return y @ np.asarray(u, np.float64) + float(bu)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shapley_exact_equals_brute_force_and_frozen_equals_dla(family):
    _, model, _ = tiny(family)
    toks = np.array([3, 14, 15, 9, 26], np.int32)
    parts = dla.residual_parts(model, toks)[:, -1]
    groups_names, member = dla.layer_groups(model.config)
    groups = jnp.asarray(member, jnp.float32) @ parts  # [G, d]
    u, bu = dla.logit_direction(model, 7, 11)
    g = groups.shape[0]
    got = np.asarray(jax.jit(lambda gr: dla.shapley_exact(model, gr, u, bu))(groups))
    # brute force: average marginal contribution over all g! orders, float64 numpy
    want = np.zeros(g)
    gn = np.asarray(groups, np.float64)
    for order in itertools.permutations(range(g)):
        x = np.zeros(gn.shape[1])
        before = np_norm_logit(model, x, u, bu)
        for i in order:
            x = x + gn[i]
            after = np_norm_logit(model, x, u, bu)
            want[i] += after - before
            before = after
    want /= math.factorial(g)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    att = dla.frozen_dla(model, parts, u, bu)
    assert got.sum() == pytest.approx(float(att.total - att.constant), abs=2e-4)  # both complete
    frozen = np.asarray(dla.shapley_exact(model, groups, u, bu, frozen_scale=True))
    grouped = np.asarray(member, np.float64) @ np.asarray(att.parts, np.float64)
    np.testing.assert_allclose(frozen, grouped, atol=2e-4, rtol=1e-4)
    assert np.abs(got - grouped).max() > 1e-3  # the norm's divisor does move credit


def test_sampled_shapley_is_complete_and_within_its_error_of_the_exact_values():
    _, model, _ = tiny("llama")
    toks = np.array([1, 2, 3, 4, 5, 6], np.int32)
    parts = dla.residual_parts(model, toks)[:, -1]
    _, member = dla.layer_groups(model.config)
    groups = jnp.asarray(member, jnp.float32) @ parts  # 7 groups
    u, bu = dla.logit_direction(model, 3)
    exact = np.asarray(dla.shapley_exact(model, groups, u, bu))
    est, se = jax.jit(lambda k: dla.shapley_sampled(model, groups, u, bu, k, 400))(jax.random.key(0))
    est, se = np.asarray(est), np.asarray(se)
    assert np.all(np.abs(est - exact) <= 4 * se + 1e-4), (est, exact, se)
    assert est.sum() == pytest.approx(exact.sum(), abs=1e-4)


def test_layer_groups_partition_the_parts_and_bad_tokens_are_refused():
    for family in FAMILIES:
        config = tiny(family)[1].config
        names, member = dla.layer_groups(config)
        assert member.sum(0).tolist() == [1] * len(dla.part_names(config))
        assert names[0] == "embed" and names[-1] == f"L{config.n_layers - 1}.mlp"
    with pytest.raises(ValueError, match="out of range"):
        dla.logit_direction(tiny("llama")[1], 61)


def _disagreement_numpy(a, b):
    """The measures written out in float64 numpy, scipy's Spearman (independent of lens)."""
    from scipy.stats import spearmanr

    top_a = np.argsort(-np.abs(a), kind="stable")
    k5, k10 = min(5, len(a)), min(10, len(a))
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k5].tolist())
    return {"rel_l1": np.abs(a - b).sum() / np.abs(a).sum(), "abs_ratio": np.abs(b).sum() / np.abs(a).sum(),
            "spearman": spearmanr(a, b).statistic, "top5_overlap": len(top_b & set(top_a[:k5].tolist())) / k5,
            "top10_sign_flips": np.mean(np.sign(a[top_a[:k10]]) != np.sign(b[top_a[:k10]]))}


@pytest.mark.parametrize("n", [3, 23])
def test_disagreement_against_numpy_jitted_and_vmapped(n):
    """Tolerance 1e-5: float32 sums of <= 23 terms of size ~1 (the numpy side is float64)."""
    rng = np.random.default_rng(n)
    a = rng.normal(size=(4, n)).astype(np.float32)
    b = (a + rng.normal(scale=0.7, size=(4, n))).astype(np.float32)
    batched = jax.vmap(dla.disagreement)(jnp.asarray(a), jnp.asarray(b))
    for i in range(4):
        want = _disagreement_numpy(a[i].astype(np.float64), b[i].astype(np.float64))
        for k, v in want.items():
            assert float(batched[k][i]) == pytest.approx(v, abs=1e-5), k
    same = dla.disagreement(jnp.asarray(a[0]), jnp.asarray(a[0]))
    assert float(same["rel_l1"]) == 0.0 and float(same["spearman"]) == pytest.approx(1.0, abs=1e-6)
    assert float(same["top5_overlap"]) == 1.0 and float(same["top10_sign_flips"]) == 0.0
    with pytest.raises(ValueError, match="same parts"):
        dla.disagreement(jnp.ones(3), jnp.ones(4))


@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_dla_norm_smoke_preset(tmp_path, monkeypatch):
    import json
    import runpy
    import sys
    from pathlib import Path

    from lens_tiny import tiny_text_model

    script = Path(__file__).resolve().parents[3] / "scripts" / "dla_norm.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", str(tiny_text_model(tmp_path / "m")),
                                      "--preset", "smoke", "--out", str(tmp_path / "o")])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python scripts/dla_norm.py` (scripts/figures.py)
    runpy.run_path(str(script), run_name="__main__")
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["settings"]["group_shapley"] == "exact" and len(r["prompts"]) == 2
    assert r["frozen_shapley_vs_a_max_abs"] < 1e-5
    for p in r["prompts"]:  # both attributions are complete
        assert p["sum_a"] == pytest.approx(p["logit_diff"] - p["constant"], abs=1e-4)
        assert p["sum_shapley_groups"] == pytest.approx(p["sum_a"], abs=1e-4)
    assert (tmp_path / "o" / "dla_scatter.png").stat().st_size > 1000
