"""lens.steering.melbo on a tiny random Llama: the split forward, orthogonality, batched == sequential,
loss decrease, resume == uninterrupted, and the degeneracy statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import geometry

from lens.steering import melbo
from lens.models import Capture, Edits

S, T = 0, 1  # source = after block 0, target = after block 1 (of 3)


def prompt_tokens():
    rs = np.random.RandomState(0)
    return [list(rs.randint(0, 61, 7)), list(rs.randint(0, 61, 5))]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    from hf_tiny import save_tiny, tiny_llama_config
    from lens.models.families import convert_hf
    from lens.models.io.safetensors_reader import read_safetensors_folder

    cfg = tiny_llama_config(3)
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny(cfg, folder)
    model = convert_hf(*read_safetensors_folder(folder), jnp.float32)
    tokens, mask = melbo.pad_prompts(prompt_tokens())
    return melbo.make_problem(model, tokens, mask, S, T)


def max_abs_cos(v):
    v = np.asarray(v, np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.abs(u @ u.T - np.eye(len(v))).max()


def test_split_forward_equals_forward_with_edits(problem):
    model = problem.model
    theta = jax.random.normal(jax.random.PRNGKey(0), (24,))
    add = jnp.zeros((3, 1, 24)).at[S + 1, 0].set(theta)
    ours = melbo.steered_target(problem, theta)
    for p in range(2):
        n = int(problem.mask[p].sum())
        out = model.forward(
            jnp.asarray(prompt_tokens()[p], jnp.int32), edits=Edits(resid_add=add),
            capture=Capture(resid=True),
        )
        np.testing.assert_allclose(ours[p, :n], out.activations.resid_pre[T + 1], atol=2e-5, rtol=1e-5)




@pytest.fixture(scope="module")
def theta0():
    return 3.0 * jax.random.normal(jax.random.PRNGKey(7), (24,))


CFG = melbo.OrthoConfig(steps=12, lr=0.01)


def test_ortho_batched_block_of_one_is_sequential_and_orthogonal(problem, theta0):
    seq = melbo.melbo_ortho(problem, theta0, 3, CFG, run=melbo.MelboRunConfig(mode="sequential", seed=3))
    one = melbo.melbo_ortho(problem, theta0, 3, CFG, run=melbo.MelboRunConfig(mode="batched", block_size=1, seed=3))
    # Same seeds, same algorithm; vmap over a block of one may only reorder float32 sums.
    np.testing.assert_allclose(one.vectors, seq.vectors, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one.losses, seq.losses, rtol=1e-5)
    allv = np.concatenate([np.asarray(theta0)[None], seq.vectors])
    assert max_abs_cos(allv) <= 1e-6
    assert np.all(seq.losses[:, -1] < seq.losses[:, 0])  # MELBO-ortho loss decreases


def test_ortho_batched_joint_orthogonality_and_resume(problem, theta0):
    full = melbo.melbo_ortho(problem, theta0, 4, CFG, run=melbo.MelboRunConfig(mode="batched", block_size=2, seed=5))
    assert max_abs_cos(np.concatenate([np.asarray(theta0)[None], full.vectors])) <= 1e-6

    saved = []

    def killed_after_first_block(result):
        saved.append(melbo.MelboResult(result.vectors.copy(), result.losses.copy()))
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
        melbo.melbo_ortho(problem, theta0, 4, CFG, run=melbo.MelboRunConfig(mode="batched", block_size=2, seed=5),
                          on_block=killed_after_first_block)
    assert saved[0].vectors.shape == (2, 24)
    resumed = melbo.melbo_ortho(problem, theta0, 4, CFG, run=melbo.MelboRunConfig(mode="batched", block_size=2, seed=5),
                                resume=saved[0])
    np.testing.assert_array_equal(resumed.vectors, full.vectors)
    np.testing.assert_array_equal(resumed.losses, full.losses)


def test_run_config_refused_at_construction():
    with pytest.raises(ValueError, match="mode"):
        melbo.MelboRunConfig(mode="parallel")
    with pytest.raises(ValueError, match="block_size"):
        melbo.MelboRunConfig(block_size=0)
    with pytest.raises(TypeError, match="Mesh"):
        melbo.MelboRunConfig(mesh="vectors")


def test_melbo_loss_decreases_norm_and_orthogonality(problem):
    cfg = melbo.MelboConfig(radius=2.0, steps=15, lr=0.05)
    res = melbo.melbo(problem, 2, cfg, run=melbo.MelboRunConfig(mode="sequential", seed=0))
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 2.0, rtol=1e-5)
    assert max_abs_cos(res.vectors) <= 1e-6
    assert np.all(res.losses[:, -1] < res.losses[:, 0])


def test_degeneracy_statistics():
    k = 5
    # K orthogonal equal effects -> K; identical -> 1 (from the cosine matrix)...
    assert melbo.cosine_stats(np.eye(k))["participation_ratio"] == pytest.approx(k)
    assert melbo.cosine_stats(np.ones((k, k)))["participation_ratio"] == pytest.approx(1.0)
    assert melbo.cosine_stats(np.ones((k, k)))["clusters"]["0.9"] == 1
    # ... and equal to lens.geometry's participation ratio of the normalised effects.
    e = np.random.RandomState(1).randn(k, 40).astype(np.float32)
    e[1] = 3 * e[0]
    ours = melbo.cosine_stats(geometry.cosine_matrix(jnp.asarray(e)))["participation_ratio"]
    assert ours == pytest.approx(float(geometry.participation_ratio(jnp.asarray(e), normalize=True)), rel=1e-5)
    assert float(geometry.participation_ratio(jnp.eye(k))) == pytest.approx(k)


def test_analysis_identical_vs_orthogonal(problem, theta0):
    # K copies of one vector: every stage's effects are identical -> PR 1.
    same = melbo.rescale(jnp.tile(theta0[None], (3, 1)), 2.0)
    a = melbo.analyse_vectors(problem, same, top_k=5, chunk=4)
    for stage in ("raw", "effective_exact", "effective_first_order", "target", "last", "logits"):
        assert a[stage]["participation_ratio"] == pytest.approx(1.0, abs=1e-4), stage
    # Random controls: orthogonal to theta0 and each other, with the requested norms.
    norms = np.array([1.0, 2.0, 3.0], np.float32)
    ctrl = melbo.random_orthogonal_controls(jax.random.PRNGKey(0), theta0, norms)
    np.testing.assert_allclose(np.linalg.norm(ctrl, axis=1), norms, rtol=1e-5)
    assert max_abs_cos(np.concatenate([np.asarray(theta0)[None], ctrl])) <= 1e-6
    small = 1e-3 * melbo.median_source_norm(problem)
    b = melbo.analyse_vectors(problem, melbo.rescale(ctrl, small), top_k=5, chunk=4)
    assert b["raw"]["participation_ratio"] == pytest.approx(3.0, rel=1e-5)
    # Small vectors act linearly: first-order effective cosines match the exact ones.
    np.testing.assert_allclose(
        b["cos_matrices"]["effective_first_order"], b["cos_matrices"]["effective_exact"], atol=1e-2
    )


def test_objective_without_first_position(problem, theta0):
    """MELBO-ortho's objective with position 0 left out equals the same distance computed by
    hand from full forwards over positions 1.. only; position 0 is still attended to (the
    later tokens' activations are those of the full prompt), and the other problem is untouched."""
    p1 = melbo.without_first_position(problem)
    assert bool(problem.mask[:, 0].all()) and not bool(p1.mask[:, 0].any())
    # Small vectors: at |theta| >> |x| every position's change is ~theta itself and the
    # choice of positions would not matter.
    theta, theta0 = 0.2 * jax.random.normal(jax.random.PRNGKey(3), (24,)), 0.05 * theta0
    got = float(jax.jit(lambda pr, th, t0: melbo.ortho_loss(pr, th, melbo.ortho_reference(pr, t0)))(p1, theta, theta0))
    model = problem.model

    def target_mean_without_first(tokens, vec):
        add = jnp.zeros((3, 1, 24)).at[S + 1, 0].set(vec)
        h = model.forward(jnp.asarray(tokens, jnp.int32), edits=Edits(resid_add=add),
                          capture=Capture(resid=True)).activations.resid_pre[T + 1]
        return np.asarray(h, np.float64)[1:].mean(axis=0)

    dists = [np.linalg.norm(target_mean_without_first(t, theta) - target_mean_without_first(t, theta0))
             for t in prompt_tokens()]
    assert got == pytest.approx(np.mean(dists), rel=1e-4)  # float32 forward vs float64 mean
    # The reference the vectors must reproduce changes when position 0 is left out.
    ref_all, ref_rest = melbo.ortho_reference(problem, theta0), melbo.ortho_reference(p1, theta0)
    assert float(jnp.abs(ref_all - ref_rest).max()) > 1e-2
    one_token = melbo.make_problem(model, jnp.asarray([[1, 2], [3, 0]]), jnp.asarray([[True, True], [True, False]]), S, T)
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        melbo.without_first_position(one_token)
