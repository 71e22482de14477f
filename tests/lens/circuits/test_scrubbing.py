"""lens.circuits.scrubbing: the treeified run against a plain numpy implementation that computes
every path on its own input; identity / empty hypotheses; feature-respecting resampling;
validation errors.  Tiny models built here (models.init), a few compiles in all."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import models
from lens.circuits import scrubbing as S
from lens.circuits import scrubbing_runs as R
from lens.circuits import scrubbing_sampling as Sm
from lens.models.core.config import ModelConfig

V, SEQ, N = 23, 7, 5  # odd sizes on purpose


def config(attn_only=True, heads=2, layers=2) -> ModelConfig:
    return ModelConfig(architecture="gpt2", vocab_size=V, d_model=16, n_layers=layers, n_heads=heads,
                       n_kv_heads=heads, d_head=4, d_mlp=0 if attn_only else 12, max_seq_len=8,
                       norm_kind="layer", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
                       positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=not attn_only,
                       norm_bias=True, tie_embeddings=True, attn_only=attn_only)


def tiny(attn_only=True, heads=2, layers=2, seed=0):
    m = models.init(config(attn_only, heads, layers), jax.random.key(seed))
    # random (not zero) biases and norm gains so every term of the brute force matters
    leaves, tree = jax.tree.flatten(m)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [l + 0.3 * jax.random.normal(k, l.shape) if eqx.is_inexact_array(l) else l
              for l, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


# ------------------------------------------------------------------ numpy brute force
def np_params(m):
    return jax.tree.map(lambda a: np.asarray(a, np.float64) if eqx.is_inexact_array(a) else a, m)


def ln(x, w, b, eps=1e-5):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w + b


def embed(p, t):
    return p.embed[t] + p.pos_embed[np.arange(len(t))]


def head_out(p, layer, h, xq, xk, xv):
    """One head's output z W_O, its query / key / value reading three residuals."""
    b = jax.tree.map(lambda a: a[layer] if isinstance(a, np.ndarray) else a, p.blocks)
    q = ln(xq, b.ln1_w, b.ln1_b) @ b.W_Q[h] + b.b_Q[h]
    k = ln(xk, b.ln1_w, b.ln1_b) @ b.W_K[h] + b.b_K[h]
    v = ln(xv, b.ln1_w, b.ln1_b) @ b.W_V[h] + b.b_V[h]
    s = q @ k.T / math.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones_like(s)) > 0, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    return (a @ v) @ b.W_O[h]


def resid(p, t, layer):
    """The plain residual entering block `layer` (layer = n_layers: the final one)."""
    x = embed(p, t)
    for l in range(layer):
        b_O = p.blocks.b_O[l]
        x = x + sum(head_out(p, l, h, x, x, x) for h in range(p.config.n_heads)) + b_O
    return x


def logits(p, x):
    return ln(x, p.final_norm_w, p.final_norm_b) @ p.embed.T


# ------------------------------------------------------------------ the tests
def test_treeified_run_equals_brute_force_per_path_jit_vmap():
    """Every path its own random input: jit(vmap(treeified_logits)) == numpy, path by path."""
    m = tiny()
    U, E, Nd = S.Uncond(), S.Exact(), S.Node
    hyp = Nd(S.Output(), E, other=U, children=(
        Nd(S.Embed(), U, positions=(0, 1, 2, 3, 4)),
        Nd(S.Head(0, 1), U, positions=(0, 1, 2, 3, 4)),
        Nd(S.Head(1, 0), E, other=U, children=(
            Nd(S.HeadInput(1, 0, "q"), U),
            Nd(S.HeadInput(1, 0, "k"), E, other=U, children=(
                Nd(S.Head(0, 0), U, other=U, children=(Nd(S.HeadInput(0, 0, "v"), U),)),
                Nd(S.Embed(), U, positions=(0, 2, 3)),
            )),
        )),
        Nd(S.Resid(1), U, positions=(5, 6), name="r1late"),  # the layer-0 stream at two positions
    ))
    S.validate(hyp, m.config, SEQ)
    tokens = np.random.default_rng(0).integers(0, V, (11, SEQ)).astype(np.int32)
    plan, runs, draws = Sm.sample_runs(hyp, len(tokens), np.random.default_rng(3), {}, ref=np.arange(N))
    assert len({tuple(r) for r in runs.T}) > 5  # the paths really drew different inputs
    got = eqx.filter_jit(lambda m, p, r: jax.vmap(lambda x: R.treeified_logits(m, p, x))(r))(
        m, plan, jnp.asarray(tokens[runs]))

    p = np_params(m)
    used = {path[-1] if len(path) > 1 else "out": d[1] for path, d in draws.items()}
    used["k.embed"] = draws[("out", "a1.h0", "a1.h0.k", "embed@[0, 2, 3]")][1]
    used["top.embed"] = draws[("out", "embed@[0, 1, 2, 3, 4]")][1]
    used["a0.h1"] = draws[("out", "a0.h1@[0, 1, 2, 3, 4]")][1]
    mask = np.zeros((SEQ, 1))
    mask[[0, 2, 3]] = 1
    late = np.zeros((SEQ, 1))
    late[[5, 6]] = 1
    for i in range(N):
        t = {k: tokens[v[i]] for k, v in used.items()}
        r0 = t["out"]
        # head 0.0 on the k path: q, k from its other run, v from its own leaf
        h00 = head_out(p, 0, 0, embed(p, t["a0.h0"]), embed(p, t["a0.h0"]), embed(p, t["a0.h0.v"]))
        k_in = (resid(p, t["a1.h0.k"], 1) + h00 - head_out(p, 0, 0, *[embed(p, t["a1.h0.k"])] * 3)
                + mask * (embed(p, t["k.embed"]) - embed(p, t["a1.h0.k"])))
        h10 = head_out(p, 1, 0, resid(p, t["a1.h0.q"], 1), k_in, resid(p, t["a1.h0"], 1))
        x = (resid(p, r0, 2)
             + (1 - late) * (embed(p, t["top.embed"]) - embed(p, r0))
             + (1 - late) * (head_out(p, 0, 1, *[embed(p, t["a0.h1"])] * 3) - head_out(p, 0, 1, *[embed(p, r0)] * 3))
             + h10 - head_out(p, 1, 0, *[resid(p, r0, 1)] * 3)
             + late * (resid(p, t["r1late"], 1) - resid(p, r0, 1)))
        np.testing.assert_allclose(np.asarray(got[i]), logits(p, x), rtol=0, atol=2e-4)  # float32 vs float64


def test_every_path_same_input_equals_plain_forward_with_mlp():
    """A fully treeified model (every path its own node, MLPs included) in which every
    path draws the same sequence computes the plain forward."""
    m = tiny(attn_only=False, heads=2, layers=1)
    tree = S.full_tree(m.config, S.Uncond())
    S.validate(tree, m.config, SEQ)
    row = np.random.default_rng(1).integers(0, V, (1, SEQ)).astype(np.int32)
    tokens = np.repeat(row, 4, axis=0)
    plan, runs, _ = Sm.sample_runs(tree, 4, np.random.default_rng(0), {})
    assert runs.shape[1] > 20
    got = jax.jit(jax.vmap(lambda r: R.treeified_logits(m, plan, r)))(jnp.asarray(tokens[runs]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.vmap(m)(tokens)), atol=1e-5)


def nll_last(logits, target):
    return -jax.nn.log_softmax(logits[-1])[target]


def test_identity_recovers_all_and_empty_none():
    m = tiny()
    tokens = np.random.default_rng(2).integers(0, V, (9, SEQ)).astype(np.int32)
    targets = (tokens[:, 0] + 1) % V
    rep = S.compare(m, tokens, {}, nll_last, targets, seeds=(0, 1, 2))
    plain = np.asarray(jax.vmap(m)(tokens))  # the model's own loss, computed directly
    want = -np.take_along_axis(jax.nn.log_softmax(plain[:, -1]), targets[:, None], 1)[:, 0]
    ident, emp = rep["hypotheses"]["identity"], rep["hypotheses"]["empty"]
    np.testing.assert_allclose(ident["per_example_losses"], want, rtol=1e-5)
    assert ident["loss_recovered_per_seed"] == pytest.approx([1.0] * 3)
    assert emp["loss_recovered_per_seed"] == pytest.approx([0.0] * 3)
    # the empty hypothesis is the model run on random other examples, scored on the reference's label
    res = S.scrub(m, tokens, S.empty(), nll_last, targets, seeds=(1,))
    other = res.draws[0][("empty",)][1]
    want_empty = -np.take_along_axis(jax.nn.log_softmax(plain[other, -1]), targets[:, None], 1)[:, 0]
    np.testing.assert_allclose(res.losses[0], want_empty, rtol=1e-5)


def test_resampling_respects_the_feature():
    tokens = np.random.default_rng(4).integers(0, V, (40, SEQ)).astype(np.int32)
    first = S.Cond("first % 3", lambda t: t[:, 0] % 3)
    pair = S.Cond("last two % 2", lambda t: t[:, -2:] % 2)
    hyp = S.Node(S.Output(), children=(
        S.Node(S.Head(1, 0), first, other=S.Uncond(), children=(
            S.Node(S.HeadInput(1, 0, "k"), pair, children=(S.Node(S.Embed(), first),)),)),))
    S.validate(hyp, config(), SEQ)
    idx = Sm.feature_indexes(hyp, tokens)
    for seed in range(3):
        _, _, draws = Sm.sample_runs(hyp, len(tokens), np.random.default_rng(seed), idx)
        head, kin, emb = (draws[p][0] for p in [("out", "a1.h0"), ("out", "a1.h0", "a1.h0.k"),
                                                ("out", "a1.h0", "a1.h0.k", "embed")])
        ref = np.arange(len(tokens))
        assert (tokens[head, 0] % 3 == tokens[ref, 0] % 3).all() and (head != ref).any()
        assert (tokens[kin, -2:] % 2 == tokens[head, -2:] % 2).all()
        assert (tokens[emb, 0] % 3 == tokens[kin, 0] % 3).all()
        # every member of a class gets drawn sometimes (uniform within the class, not a fixed pick)
    many = np.concatenate([Sm.sample_runs(hyp, len(tokens), np.random.default_rng(s), idx)[2][("out", "a1.h0")][0]
                           for s in range(30)])
    assert len(np.unique(many)) == len(tokens)


def test_clear_errors():
    c = config()
    Nd = S.Node
    cases = [
        (Nd(S.Output(), children=(Nd(S.Head(2, 0)),)), "layer 2 does not exist"),
        (Nd(S.Output(), children=(Nd(S.Head(1, 5)),)), "head 5 does not exist"),
        (Nd(S.Output(), children=(Nd(S.MLP(0)),)), "no MLP"),
        (Nd(S.Output(), children=(Nd(S.Head(1, 0)), Nd(S.Head(1, 0), S.Uncond()))), "same writer"),
        (Nd(S.Output(), children=(Nd(S.Resid(1)), Nd(S.Head(0, 1)))), "same writer"),
        (Nd(S.Output(), children=(Nd(S.Head(0, 0), children=(Nd(S.HeadInput(1, 0, "q")),)),)), "own HeadInput"),
        (Nd(S.Output(), children=(Nd(S.Head(0, 0), children=(
            Nd(S.HeadInput(0, 0, "q"), children=(Nd(S.Head(0, 1)),)),)),)), "not upstream"),
        (Nd(S.Output(), children=(Nd(S.Embed(), positions=(9,)),)), "out of range"),
        (Nd(S.Head(0, 0)), "root"),
        (Nd(S.Output(), children=(Nd(S.Embed(), name="x"), Nd(S.Head(0, 0), name="x"))), "given to two nodes"),
    ]
    for hyp, msg in cases:
        with pytest.raises(S.HypothesisError, match=msg):
            S.validate(hyp, c, SEQ)
    Nd(S.Output(), children=(Nd(S.Head(1, 0), positions=(0,)), Nd(S.Head(1, 0), S.Uncond(), positions=(1, 2))))
    tokens = np.arange(3 * SEQ).reshape(3, SEQ).astype(np.int32) % V
    lonely = S.Cond("first", lambda t: t[:, 0])
    with pytest.raises(S.HypothesisError, match=r"3 of 3 examples hold a value no other example shares \(example 0"):
        Sm.feature_indexes(Nd(S.Output(), children=(Nd(S.Embed(), lonely),)), tokens)


def test_loss_recovered_and_interval():
    rec = S.loss_recovered(1.0, np.array([3.0, 3.0, 5.0]), np.array([2.0, 1.0, 5.0]))
    np.testing.assert_allclose(rec, [0.5, 1.0, 0.0])
    v = np.array([0.2, 0.4, 0.9, 0.5])
    m, lo, hi = S.mean_interval(v)
    half = 3.182 * np.std(v, ddof=1) / 2  # t(0.975, 3 dof) * s / sqrt(4)
    assert (m, lo, hi) == pytest.approx((0.5, 0.5 - half, 0.5 + half))


def test_scrub_from_shared_plain_runs_equals_per_example_treeified_run():
    """scrub (plain runs of the dataset gathered, odd-sized padded chunks) == treeified_logits
    on each example's own run tokens (the path the numpy brute force above checks)."""
    m = tiny(attn_only=False, heads=2, layers=2)
    tokens = np.random.default_rng(5).integers(0, V, (11, SEQ)).astype(np.int32)
    targets = (tokens[:, 0] + 3) % V
    U, E, Nd = S.Uncond(), S.Exact(), S.Node
    hyp = Nd(S.Output(), E, other=U, children=(
        Nd(S.MLP(1), E, other=U, children=(Nd(S.MLPInput(1), U, (Nd(S.Head(1, 1), E),)),)),
        Nd(S.Head(1, 0), U, other=U, children=(Nd(S.HeadInput(1, 0, "v"), E, (Nd(S.Embed(), U),)),)),))
    S.validate(hyp, m.config, SEQ)
    plain = R.plain_runs(m, tokens)
    per = S._bytes_per_example(m.config, sum(1 for _ in hyp.walk()), SEQ)
    got = S.scrub(m, tokens, hyp, nll_last, targets, seeds=(0, 1), memory_budget=2 * 3 * per + 1, plain=plain)
    for i, seed in enumerate((0, 1)):
        plan, runs, _ = Sm.sample_runs(hyp, len(tokens), np.random.default_rng(seed), {})
        logits = jax.jit(jax.vmap(lambda r: R.treeified_logits(m, plan, r)))(jnp.asarray(tokens[runs]))
        want = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, -1])), targets[:, None], 1)[:, 0]
        np.testing.assert_allclose(got.losses[i], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        S.scrub(m, tokens[:5], hyp, nll_last, targets[:5], plain=plain)
    with pytest.raises(ValueError, match="token ids out of range"):
        R.plain_runs(m, tokens + V)


def test_over_budget_dataset_falls_back_to_per_chunk_plain_runs():
    """A budget too small for the dataset's plain runs: each chunk runs its own (the path
    of `treeified_logits`); same losses as the shared plain runs."""
    m = tiny()
    tokens = np.random.default_rng(6).integers(0, V, (9, SEQ)).astype(np.int32)
    targets = (tokens[:, 1] + 2) % V
    U, E, Nd = S.Uncond(), S.Exact(), S.Node
    hyp = Nd(S.Output(), E, other=U, children=(
        Nd(S.Head(1, 1), E, other=U, children=(Nd(S.HeadInput(1, 1, "k"), U, (Nd(S.Head(0, 0), E),)),)),))
    small = 2 * R.plain_bytes(m.config, SEQ) * 4  # fits 4 examples' plain runs, not 9
    assert not S.plain_fits(m.config, tokens.shape, small)
    got = S.scrub(m, tokens, hyp, nll_last, targets, seeds=(0, 1), memory_budget=small)
    want = S.scrub(m, tokens, hyp, nll_last, targets, seeds=(0, 1))
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ chunked, threaded dispatch
def test_chunks_cover_every_example_in_equal_thread_multiples():
    for n, per, budget, workers in [(11, 10, 35, 3), (1000, 1, 1e9, 2), (7, 1, 2, 2), (5, 100, 1, 4), (2, 1, 1e9, 3)]:
        chunks = R.chunk_indices(budget, per, n, workers)
        assert len({len(ch) for ch in chunks}) == 1  # one compiled shape
        assert sorted(set(np.concatenate(chunks).tolist())) == list(range(n))
        assert np.concatenate(chunks).tolist()[:n] == list(range(n))  # in order, padding only at the end
        assert len(chunks) % workers == 0 or len(chunks) == n  # every thread the same work
        assert len(chunks[0]) <= max(1, budget / workers // per) or len(chunks) == n  # the budget is shared


def test_plain_runs_chunked_on_threads_equal_numpy():
    """Layer-major plain runs, several odd-sized chunks on 3 threads == the numpy forward."""
    m = tiny(heads=3)
    tokens = np.random.default_rng(7).integers(0, V, (11, SEQ)).astype(np.int32)
    small = 3 * (R.plain_bytes(m.config, SEQ) + 4 * SEQ * (3 * SEQ + 4 * 16))  # ~3 examples a chunk
    plain = R.plain_runs(m, tokens, memory_budget=small, workers=3)
    assert plain.resid_mid is None and plain.mlp_out is None  # attention-only: nothing reads them
    p = np_params(m)
    for i, t in enumerate(tokens):
        for layer in range(2):
            np.testing.assert_allclose(plain.resid_pre[layer, i], resid(p, t, layer), atol=2e-5)
            x = resid(p, t, layer)
            for h in range(3):
                got = np.asarray(plain.head_z[layer, i, :, h]) @ p.blocks.W_O[layer, h]
                np.testing.assert_allclose(got, head_out(p, layer, h, x, x, x), atol=2e-5)
        np.testing.assert_allclose(plain.final[i], resid(p, t, 2), atol=2e-5)


def test_plain_runs_with_mlp_equal_per_example_forward_captures():
    m = tiny(attn_only=False, heads=2, layers=2)
    tokens = np.random.default_rng(8).integers(0, V, (5, SEQ)).astype(np.int32)
    plain = R.plain_runs(m, tokens, memory_budget=2 * R.plain_bytes(m.config, SEQ), workers=2)
    cap = models.Capture(resid=True, sublayers=True, head_z=True)
    for i, t in enumerate(tokens):
        acts = m.forward(jnp.asarray(t), capture=cap).activations
        for field in ("resid_pre", "resid_mid", "head_z", "mlp_out"):
            np.testing.assert_allclose(getattr(plain, field)[:, i], getattr(acts, field), atol=1e-5)


def test_scrub_equal_for_any_workers_and_chunking():
    """1 thread and one chunk, 3 threads with small chunks, and 2 threads each chunk running
    its own plain runs (over budget) give the same losses."""
    m = tiny(attn_only=False, heads=2, layers=2)
    tokens = np.random.default_rng(9).integers(0, V, (13, SEQ)).astype(np.int32)
    targets = (tokens[:, 2] + 1) % V
    U, E, Nd = S.Uncond(), S.Exact(), S.Node
    hyp = Nd(S.Output(), E, other=U, children=(
        Nd(S.Head(1, 1), E, other=U, children=(Nd(S.HeadInput(1, 1, "q"), U, (Nd(S.Head(0, 0), E),)),)),
        Nd(S.MLP(0), U, other=U, children=(Nd(S.MLPInput(0), E, (Nd(S.Embed(), U),)),)),))
    one = S.scrub(m, tokens, hyp, nll_last, targets, seeds=(0, 1), workers=1)
    per = S._bytes_per_example(m.config, sum(1 for _ in hyp.walk()), SEQ)
    many = S.scrub(m, tokens, hyp, nll_last, targets, seeds=(0, 1), workers=3, memory_budget=2 * 2 * per + 1)
    small = 2 * R.plain_bytes(m.config, SEQ) * 4
    fallback = S.scrub(m, tokens, hyp, nll_last, targets, seeds=(0, 1), workers=2, memory_budget=small)
    np.testing.assert_allclose(many.losses, one.losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fallback.losses, one.losses, rtol=1e-5, atol=1e-6)
