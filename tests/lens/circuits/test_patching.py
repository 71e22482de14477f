"""lens.circuits.patching on the tiny GQA Llama (3 layers, 6 query heads on 2 KV heads, d 24):
the vmapped grids against a loop of single patches (`lens.core.edits.patch`, one plain forward
each) and, for a few cells, against transformers with PyTorch hooks; AtP against central
finite differences; the QK fix's recomputed pattern against transformers' own; exact
recovery and sign checks with a pair differing at one position; path patching against its
three steps run one by one; bad input refused.

Tolerances: metrics are logit differences O(1) in float32; ours vs a loop of our own
forwards agree to ~1e-6 (other summation order inside vmap), vs transformers to ~1e-6
(test_edits measured 9.4e-7 on logits): TOL = 1e-5.  Finite differences: central, eps 1e-2,
truncation O(eps^2) times a third derivative of O(1) plus float32 rounding 1e-7 / eps:
FD_TOL = 2e-3 (the measured gap is printed by the assertion on failure).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lens
from hf_tiny import hooked, pre_edit, record
from lens.core import edits as E
from lens.circuits import attribution as At
from lens.circuits import patching as Pt
from lens.circuits.path_patching import path_completeness, path_patching
from lens_tiny import VOCAB, tiny
from lens.models import Capture, Edits

TOL = 1e-5
FD_TOL = 2e-3
SEQ = 7
RNG = np.random.RandomState(3)
CLEAN = RNG.randint(0, VOCAB, size=(2, SEQ)).astype(np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[:, 2] = (CLEAN[:, 2] + 7) % VOCAB  # one differing position: p = 2
CORRUPT[1, 4] = (CLEAN[1, 4] + 3) % VOCAB  # and a second one in pair 1
METRIC = Pt.logit_diff_metric([5, 11], [9, 2], position=-1)  # per pair


def model():
    return tiny("llama")[1]


def one(metric, i):
    """Pair i's metric (the [P] arrays indexed)."""
    return jax.tree.map(lambda a: a[i] if eqx.is_array(a) and a.ndim else a, metric)


@functools.lru_cache(maxsize=None)
def grid(site, direction="denoise", per_position=False):
    return np.asarray(Pt.activation_patching(model(), CLEAN, CORRUPT, METRIC, site=site,
                                             direction=direction, per_position=per_position,
                                             chunk_size=5))  # odd: the last chunk is padded


@functools.lru_cache(maxsize=None)
def cache(tokens):
    return lens.run_with_cache(model(), np.asarray(tokens))[1]


def loop_value(site, pair, direction, **where):
    """One patch by hand: `lens.core.edits.patch` from the source run's cache, a plain forward."""
    base, source = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    e = E.patch(model(), cache(tuple(source[pair])), site=site, **where)
    return float(one(METRIC, pair)(_forward(model(), jnp.asarray(base[pair]), e)))


@eqx.filter_jit
def _forward(m, tokens, e):
    return m(tokens, edits=e)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_resid_grid_equals_loop_of_single_patches(direction):
    g = grid("resid", direction)
    assert g.shape == (2, 3, SEQ)
    for pair in range(2):
        for layer in range(3):
            for p in range(SEQ):
                ref = loop_value("resid", pair, direction, layers=layer, positions=p)
                assert abs(g[pair, layer, p] - ref) < TOL, (pair, layer, p, g[pair, layer, p], ref)


@pytest.mark.parametrize("site,per_position", [("heads", True), ("k_input", False),
                                               ("mlp_out", False)])
def test_other_grids_equal_loop_of_single_patches(site, per_position):
    g = grid(site, "denoise", per_position)
    c = model().config
    pair = 1
    if site == "heads":
        assert g.shape == (2, 3, c.n_heads, SEQ)
        cells = [(l, h, p) for l in range(3) for h in (0, 5) for p in (2, 4, 6)]
        for l, h, p in cells:
            ref = loop_value("heads", pair, "denoise", layers=l, positions=p, heads=[h])
            assert abs(g[pair, l, h, p] - ref) < TOL, (l, h, p)
    elif site == "k_input":
        assert g.shape == (2, 3, c.n_kv_heads)
        for l in range(3):
            for h in range(c.n_kv_heads):
                ref = loop_value("k_input", pair, "denoise", layers=l, heads=[h])
                assert abs(g[pair, l, h] - ref) < TOL, (l, h)
    else:
        assert g.shape == (2, 3, SEQ)
        for l in range(3):
            for p in range(SEQ):
                ref = loop_value("mlp_out", pair, "denoise", layers=l, positions=p)
                assert abs(g[pair, l, p] - ref) < TOL, (l, p)


def test_cells_equal_transformers_with_hooks():
    """resid (l, p), a head's output at every position and an MLP output at p: patched by
    PyTorch hooks in transformers, the clean activation recorded there too."""
    hf = tiny("llama")[0]
    layers = hf.model.layers
    pair, clean, corrupt = 0, CLEAN[0], CORRUPT[0]
    c, d = model().config, model().config.d_head
    ld = lambda logits: logits[-1, 5] - logits[-1, 9]  # noqa: E731  METRIC of pair 0

    def set_rows(p, value):
        def fn(x):
            x = x.clone()
            x[:, p] = value
            return x
        return fn

    resid = torch.as_tensor(record(hf, layers[1], clean))
    ref = ld(hooked(hf, [(layers[1], "pre_", pre_edit(set_rows(3, resid[3])))], corrupt))
    assert abs(grid("resid")[pair, 1, 3] - ref) < TOL

    z = torch.as_tensor(record(hf, layers[2].self_attn.o_proj, clean))  # [seq, heads*d_head]

    def set_head(x, h=4):
        x = x.clone()
        x[..., h * d:(h + 1) * d] = z[:, h * d:(h + 1) * d]
        return x

    ref = ld(hooked(hf, [(layers[2].self_attn.o_proj, "pre_", pre_edit(set_head))], corrupt))
    heads = np.asarray(Pt.activation_patching(model(), clean, corrupt, one(METRIC, 0), site="heads"))
    assert heads.shape == (3, c.n_heads)
    assert abs(heads[2, 4] - ref) < TOL

    seen = []
    hooked(hf, [(layers[0].mlp, "", lambda m, a, out: seen.append(out[0].clone()))], clean)
    ref = ld(hooked(hf, [(layers[0].mlp, "", lambda m, a, out: set_rows(2, seen[0][2])(out))], corrupt))
    assert abs(grid("mlp_out")[pair, 0, 2] - ref) < TOL


def test_one_differing_position_denoises_exactly_and_noises_to_zero():
    """Pair 0 differs only at position 2: at layer 0 the residuals of every other position
    are identical in both runs, so patching position 2 there IS the clean run (normalised
    metric 1) and patching any other position changes nothing (0); noising mirrors it.
    Denoising every position of any layer recovers the clean run: 1."""
    m = model()
    norm = Pt.normalized_metric(m, CLEAN[0], CORRUPT[0], one(METRIC, 0))
    den = np.asarray(Pt.activation_patching(m, CLEAN[0], CORRUPT[0], norm, site="resid"))
    noi = np.asarray(Pt.activation_patching(m, CLEAN[0], CORRUPT[0], norm, site="resid",
                                            direction="noise"))
    others = [p for p in range(SEQ) if p != 2]
    np.testing.assert_allclose(den[0, 2], 1.0, atol=TOL)
    np.testing.assert_allclose(den[0, others], 0.0, atol=TOL)
    np.testing.assert_allclose(noi[0, 2], 0.0, atol=TOL)
    np.testing.assert_allclose(noi[0, others], 1.0, atol=TOL)
    # positions before 2 never see the difference at any layer (causal): no effect
    np.testing.assert_allclose(den[:, :2], 0.0, atol=TOL)
    for layer in range(3):
        e = E.patch(m, cache(tuple(CLEAN[0])), "resid", layers=layer)
        assert abs(float(norm(_forward(m, jnp.asarray(CORRUPT[0]), e))) - 1.0) < TOL


@pytest.mark.parametrize("site", ["resid", "heads"])
def test_atp_equals_central_finite_differences(site):
    """AtP - metric(base) = d metric / d mix at 0 for each single-site patch; the finite
    difference uses `lens.core.edits.patch`'s edit with its mix scaled to +-eps."""
    m = model()
    pair, eps = 1, 1e-2
    met = one(METRIC, pair)
    atp = np.asarray(At.attribution_patching(m, CLEAN[pair], CORRUPT[pair], met, site=site))
    base_value = float(met(m(jnp.asarray(CORRUPT[pair]))))
    src = cache(tuple(CLEAN[pair]))
    cells = [(0, 2), (1, 4), (2, 6), (1, 2)] if site == "resid" else [(0, 1), (1, 3), (2, 5)]
    for cell in cells:
        where = dict(layers=cell[0], positions=cell[1]) if site == "resid" else dict(layers=cell[0], heads=[cell[1]])
        e = E.patch(m, src, site=site, **where)
        field = "resid_mix" if site == "resid" else "head_mix"
        vals = [float(met(_forward(m, jnp.asarray(CORRUPT[pair]),
                                   eqx.tree_at(lambda x: getattr(x, field), e, getattr(e, field) * s))))
                for s in (eps, -eps)]
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs((atp[cell] - base_value) - fd) < FD_TOL, (cell, atp[cell] - base_value, fd)


def test_qk_fix_pattern_and_estimate_match_transformers():
    """The QK fix's recomputed pattern for a query patch equals transformers' pattern with
    that head's q_proj output replaced by the clean run's; the unpatched recomputation equals
    the model's own pattern; and the QK-fixed estimate of head h equals the finite-difference
    derivative along z' = A' v (the pattern from transformers, our model for the rest)."""
    hf, m = tiny("llama")[0], model()
    c = m.config
    clean, corrupt = CLEAN[1], CORRUPT[1]
    met = one(METRIC, 1)
    layer, h, d = 1, 3, c.d_head
    q_clean = torch.as_tensor(record_out(hf, hf.model.layers[layer].self_attn.q_proj, clean))

    def set_q(mod, args, out):
        out = out.clone()
        out[0, :, h * d:(h + 1) * d] = q_clean[:, h * d:(h + 1) * d]
        return out

    handle = hf.model.layers[layer].self_attn.q_proj.register_forward_hook(set_q)
    try:
        with torch.no_grad():
            att = hf(input_ids=torch.as_tensor(corrupt[None]), output_attentions=True).attentions
    finally:
        handle.remove()
    a_fixed = att[layer][0, h].numpy()
    _, b = lens.run_with_cache(m, corrupt, Capture(resid=True, qkv=True, attn_pattern=True, head_z=True))
    _, s = lens.run_with_cache(m, clean, Capture(resid=True))
    qpos = jnp.arange(SEQ)
    valid = jnp.ones(SEQ, bool)
    own = At.attention_pattern(m, 1, b.resid_pre[1], b.resid_pre[1], qpos, valid)
    np.testing.assert_allclose(own, b.attn_pattern[1], atol=TOL)
    mine = At.attention_pattern(m, 1, s.resid_pre[1], b.resid_pre[1], qpos, valid)[h]
    np.testing.assert_allclose(mine, a_fixed, atol=TOL)
    # the estimate: derivative along z' - z for head h at layer 1, z' = A'_h v
    v = np.asarray(b.v[layer])[:, h // (c.n_heads // c.n_kv_heads)]  # [seq, d_head]
    z_fixed = np.asarray(b.head_z).copy()
    z_fixed[layer, :, h] = a_fixed @ v
    eps = 1e-2
    mix = np.zeros((3, 1, c.n_heads), np.float32)
    vals = []
    for sgn in (eps, -eps):
        mix[layer, 0, h] = sgn
        e = Edits(head_mix=jnp.asarray(mix), head_source=jnp.asarray(z_fixed))
        vals.append(float(met(_forward(m, jnp.asarray(corrupt), e))))
    fd = (vals[0] - vals[1]) / (2 * eps)
    fixed = np.asarray(At.attribution_patching(m, clean, corrupt, met, site="q_input", qk_fix=True))
    base_value = float(met(m(jnp.asarray(corrupt))))
    assert abs(fixed[layer, h] - base_value - fd) < FD_TOL


def record_out(hf, module, tokens) -> np.ndarray:
    """The output of `module` on one transformers forward ([seq, ...])."""
    seen = []
    hooked(hf, [(module, "", lambda mod, a, out: seen.append(out[0].clone()))], tokens)
    return seen[0].numpy()


def test_graddrop_last_layer_nodes_keep_their_atp():
    """A node of the last layer reaches the metric only through its own layer: dropping an
    earlier layer's writes leaves its gradient alone and dropping its own zeroes it, so
    AtP*'s 1/(L-1) sum_l |AtP_l| is |AtP| there; earlier layers' nodes differ."""
    m = model()
    met = one(METRIC, 1)
    atp = np.asarray(At.attribution_patching(m, CLEAN[1], CORRUPT[1], met, site="heads"))
    base_value = float(met(m(jnp.asarray(CORRUPT[1]))))
    star = np.asarray(At.atp_star(m, CLEAN[1], CORRUPT[1], met, site="heads"))
    np.testing.assert_allclose(star[-1], np.abs(atp[-1] - base_value), atol=1e-5)
    assert (star >= 0).all()
    assert not np.allclose(star[0], np.abs(atp[0] - base_value), atol=1e-4)


def test_run_from_jit_vmap_equals_forward():
    """`run_from` (the traced-start continuation the grid uses), jitted and vmapped over K = 3
    starts and edits, equals the plain forward with those edits."""
    m = model()
    c = m.config
    tokens = jnp.asarray(CLEAN[0])
    _, b = lens.run_with_cache(m, tokens, Capture(resid=True))
    rng = np.random.RandomState(0)
    starts = jnp.asarray([0, 2, 1])
    adds = np.zeros((3, c.n_layers, 1, c.d_model), np.float32)
    for k, s in enumerate([0, 2, 1]):
        adds[k, s:] = rng.randn(c.n_layers - s, 1, c.d_model)
    f = jax.jit(jax.vmap(lambda s, a: Pt.run_from(m, b.resid_pre[s], tokens, s, Edits(resid_add=a))))
    out = f(starts, jnp.asarray(adds))
    for k in range(3):
        ref = m(tokens, edits=Edits(resid_add=jnp.asarray(adds[k])))
        np.testing.assert_allclose(out[k], ref, atol=TOL)


def test_path_patching_equals_its_steps_by_hand():
    """Wang et al.'s three steps, one forward at a time, for a few senders; senders at or
    after the receiver's layer leave the metric at the base run's value."""
    m = model()
    c = m.config
    met = one(METRIC, 1)
    clean, corrupt = CLEAN[1], CORRUPT[1]
    receivers = [(2, 1), (2, 4)]
    g = np.asarray(path_patching(m, clean, corrupt, met, receivers, receiver_input="q", chunk_size=4))
    _, zb = lens.run_with_cache(m, clean, Capture(head_z=True))
    _, zs = lens.run_with_cache(m, corrupt, Capture(head_z=True))
    for sl, sh in [(0, 0), (1, 5)]:
        z = np.asarray(zb.head_z).copy()
        z[sl, :, sh] = np.asarray(zs.head_z)[sl, :, sh]
        frozen = Edits(head_mix=jnp.ones((3, 1, c.n_heads)), head_source=jnp.asarray(z))
        _, run2 = lens.run_with_cache(m, clean, Capture(resid=True), edits=frozen)
        e = E.patch(m, None, "q_input", layers=2, heads=[1, 4], source=run2.resid_pre)
        ref = float(met(_forward(m, jnp.asarray(clean), e)))
        assert abs(g[sl, sh] - ref) < TOL, (sl, sh, g[sl, sh], ref)
    base_value = float(met(m(jnp.asarray(clean))))
    np.testing.assert_allclose(g[2], base_value, atol=TOL)


def test_path_completeness_equals_its_steps_by_hand():
    """All senders before the receiver's layer at once (run 2 with every such head's z from
    the corrupted run), the receiver's whole query input from the corrupted run, and the
    base metric: each by hand with lens.core.edits, for both pairs at once (batched)."""
    m = model()
    c = m.config
    receivers = [(2, 1)]
    r = path_completeness(m, CLEAN, CORRUPT, METRIC, receivers, "q")
    for i in range(2):
        met = one(METRIC, i)
        _, zb = lens.run_with_cache(m, CLEAN[i], Capture(head_z=True))
        _, zs = lens.run_with_cache(m, CORRUPT[i], Capture(head_z=True, resid=True))
        z = np.asarray(zb.head_z).copy()
        z[:2] = np.asarray(zs.head_z)[:2]  # every head of layers 0 and 1
        frozen = Edits(head_mix=jnp.ones((3, 1, c.n_heads)), head_source=jnp.asarray(z))
        _, run2 = lens.run_with_cache(m, CLEAN[i], Capture(resid=True), edits=frozen)
        e = E.patch(m, None, "q_input", layers=2, heads=[1], source=run2.resid_pre)
        assert abs(r["all_senders"][i] - float(met(_forward(m, jnp.asarray(CLEAN[i]), e)))) < TOL
        own = E.patch(m, None, "q_input", layers=2, heads=[1], source=zs.resid_pre)
        assert abs(r["receiver_input"][i] - float(met(_forward(m, jnp.asarray(CLEAN[i]), own)))) < TOL
        assert abs(r["base"][i] - float(met(m(jnp.asarray(CLEAN[i]))))) < TOL


def test_bad_input_is_refused():
    m = model()
    with pytest.raises(ValueError, match="not token-aligned"):
        Pt.activation_patching(m, CLEAN[0], CORRUPT[0, :5], one(METRIC, 0))
    with pytest.raises(ValueError, match="site must be one of"):
        Pt.activation_patching(m, CLEAN[0], CORRUPT[0], one(METRIC, 0), site="embed")
    with pytest.raises(ValueError, match="direction"):
        Pt.activation_patching(m, CLEAN[0], CORRUPT[0], one(METRIC, 0), direction="up")
    with pytest.raises(ValueError, match="per_position"):
        Pt.activation_patching(m, CLEAN[0], CORRUPT[0], one(METRIC, 0), per_position=True)
    with pytest.raises(ValueError, match="one entry per pair"):
        Pt.activation_patching(m, CLEAN, CORRUPT, Pt.logit_diff_metric([1, 2, 3], [4, 5, 6]))
    with pytest.raises(ValueError, match="out of range"):
        Pt.activation_patching(m, CLEAN[0] + VOCAB, CORRUPT[0], one(METRIC, 0))
    with pytest.raises(ValueError, match="qk_fix"):
        At.attribution_patching(m, CLEAN[0], CORRUPT[0], one(METRIC, 0), site="resid", qk_fix=True)
    with pytest.raises(ValueError, match="nothing to normalise"):
        Pt.normalized_metric(m, CLEAN[0], CLEAN[0], one(METRIC, 0))
    with pytest.raises(ValueError, match="receiver"):
        path_patching(m, CLEAN[0], CORRUPT[0], one(METRIC, 0), [(3, 0)])


def test_compare_counts_overlap_and_false_negatives():
    effect = np.array([[5.0, 0.1], [-4.0, 0.0]])
    estimate = np.array([[4.0, 3.0], [0.0, 0.2]])  # the -4 site is missed (rank 3)
    r = At.compare_estimate(effect, estimate, k=2, n_false_negatives=1)
    assert r["topk_overlap"] == 0.5
    assert r["topk_overlap_ties"] == 0.5  # 0.1 is not within 5% of 5 of the 2nd largest, 4
    tied = At.compare_estimate(np.array([1.0, 0.99, 0.98, 0.0]), np.array([0.0, 0.1, 0.5, 0.0]), k=2)
    assert tied["topk_overlap"] == 0.5 and tied["topk_overlap_ties"] == 1.0
    assert r["worst_false_negatives"][0]["effect"] == -4.0
    assert r["worst_false_negatives"][0]["estimate_rank"] == 3
    np.testing.assert_allclose(r["pearson"], np.corrcoef(effect.ravel(), estimate.ravel())[0, 1])


@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_patching_script_smoke(tmp_path):
    """scripts/patching.py --preset smoke end to end (SmolLM2's first 2 blocks, 4 pairs over
    the 4 IOI templates, both corruptions): report.md (verdict first), report.json with
    n_pairs, corruptions, a grid per site with intervals, AtP / AtP* grids, ranked lists,
    head roles, path_completeness, PNGs."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "scripts" / "patching.py"
    argv = sys.argv
    sys.argv = [str(script), "--out", str(tmp_path), "--preset", "smoke"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["corruptions"]["ioi"] == ["s2", "abc"] and report["n_pairs"]["ioi"] == {"s2": 4, "abc": 4}
    for corr in ("s2", "abc"):
        r = report["tasks"]["ioi"][corr]
        assert r["templates"] == [0, 1, 2, 3]  # every template
        grid = report["grid"]["ioi"][corr]
        assert set(grid) == {"resid", "heads"}
        n_pos = len(r["position_labels"])  # the length groups' positions side by side
        assert np.shape(grid["resid"]["patching"]) == np.shape(grid["resid"]["atp"]) == (2, n_pos)
        lo, hi = (np.asarray(v) for v in grid["heads"]["patching_interval_95"])
        mean = np.asarray(grid["heads"]["patching"])
        assert lo.shape == mean.shape == (2, 9) and (lo <= mean + 1e-9).all() and (mean <= hi + 1e-9).all()
        assert (np.asarray(grid["heads"]["atp_star"]) >= 0).all()
        assert len(r["compare"]["heads"]["atp"]["pearson_interval_95"]) == 2
        effects = [abs(x["effect"]) for x in r["ranked"]["heads"]]
        assert effects == sorted(effects, reverse=True)  # ranked by |effect|
        assert {"attn_end_to_io", "dla_io_minus_s", "induction_score", "duplicate_token_score"} <= set(r["head_roles"][0])
        pc = report["path_completeness"]["ioi"][corr]
        assert pc and all("fraction_explained" in v and "meaning" in v for v in pc.values())
    assert report["performance"]["ioi"]["overall"]["n"] == 8
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Patching report") and "pipeline check only" in text.split("\n")[2]
    assert (tmp_path / "ioi_s2_resid.png").stat().st_size > 0 and (tmp_path / "ioi_abc_path.png").exists()
    # scripts/patching_report.py writes the same report.md again from report.json alone
    (tmp_path / "report.md").unlink()
    runpy.run_path(str(script.parent / "patching_report.py"))["render"](tmp_path)
    assert (tmp_path / "report.md").read_text() == text


def test_kl_metric_grid():
    """KL(clean || patched) at the last token: 0 where the patch restores the clean run (pair
    0's differing position at layer 0), KL(clean || corrupted) (numpy, from the two runs'
    logits) where it changes nothing."""
    m = model()
    kl = Pt.kl_metric(m, CLEAN[0], position=-1)
    g = np.asarray(Pt.activation_patching(m, CLEAN[0], CORRUPT[0], kl, site="resid"))

    def logp(tokens):
        z = np.asarray(m(jnp.asarray(tokens)))[-1].astype(np.float64)
        return z - np.log(np.exp(z - z.max()).sum()) - z.max()

    a, b = logp(CLEAN[0]), logp(CORRUPT[0])
    ref = float(np.sum(np.exp(a) * (a - b)))
    assert ref > 1e-3
    np.testing.assert_allclose(g[0, 2], 0.0, atol=TOL)
    np.testing.assert_allclose(g[0, [0, 1, 3, 4, 5, 6]], ref, rtol=1e-4, atol=TOL)


def test_effect_stats_compares_each_estimate_with_the_pair_mean_effect():
    """An exact AtP and an AtP* equal to |effect| correlate perfectly (Pearson 1 to 1e-12 in
    float64) and share the top-k; an estimate of the negated effect correlates at -1."""
    rng = np.random.default_rng(0)
    effect = rng.normal(size=(3, 4, 5))
    r = At.effect_stats(effect, effect.copy(), -effect, np.abs(effect), topk=3)
    assert set(r) == {"atp", "atp_qk_fix", "atp_star"}
    assert r["atp"]["pearson"] == pytest.approx(1.0, abs=1e-12) and r["atp"]["topk_overlap"] == 1.0
    assert r["atp_qk_fix"]["pearson"] == pytest.approx(-1.0, abs=1e-12)
    want = np.corrcoef(np.abs(effect).mean(0).ravel(), np.abs(effect).mean(0).ravel())[0, 1]
    assert r["atp_star"]["pearson"] == pytest.approx(want, abs=1e-12)
    assert "atp_qk_fix" not in At.effect_stats(effect, effect, None, np.abs(effect), topk=3)
