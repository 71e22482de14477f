"""lens.geometry against what real models actually compute, at real activations.

Two cases, each loaded once per module:
  smollm2  the default model (RMSNorm, d = 576), two prompts;
  gpt2     a tiny random GPT-2 (LayerNorm with random gains and biases, d = 48).
Each check compares an analytic formula with the model's own computation: its norm
(`models.core.layers.apply_norm` with that layer's weight and bias, the function the forward
calls), its captured norm divisors, and its logits.

Tolerances are relative to the size of the quantity compared, because real activations are
large (SmolLM2 |resid_pre| ~ 40-700 for ordinary tokens, ~2e4 for the first token) and
float32 rounding scales with them.  Measured errors (both cases) are ~1e-7 relative
everywhere, i.e. float32 rounding; each tolerance keeps a margin of ~100x over it while
staying far below the size of a real mistake (a missing gain, bias, centring or eps moves
these quantities by 1e-4 to O(1)):
  * Jacobian: entries ~gamma/sigma; the analytic form and autodiff evaluate the same
    expression in a different order: 1e-5 * max|J| (measured 1.4e-7).
  * displacements: each normed output is ~gamma * O(1) per coordinate with ~1e-7 relative
    rounding: 1e-5 * max|N(x)| (measured 8e-8).
  * logits: float32 sums over d products: 1e-5 * max|logit| (measured 4e-7).
  * divisors: the same float32 operations on the same inputs: rtol 1e-6 (measured 1 ulp).
  * effective cosine: exact displacements of orthogonal pairs (orthogonal to float32
    Gram-Schmidt, ~1e-8) follow the closed form pair by pair: atol 1e-5 (measured 4e-7).
    For SmolLM2 eps does not matter (t = eps d / |x|^2 ~ 2e-7 at the middle layer), so
    the ideal eps = 0 form must hold too.  The tiny GPT-2's activations are small
    (t ~ 4e-4, shifting the cosine by up to 1.4e-4), so it is compared with the eps-aware
    form `lens.geometry.orthogonal_pair_cosine_eps`, and the same tolerance would catch a dropped eps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens.geometry as geo
from lens import models
from lens.geometry import on_model as gr
from lens.models.core import layers

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

PROMPTS = ["The capital of France is", "def add(a, b):\n    return a +"]
RHOS = np.array([0.1, 0.3, 1.0, 3.0, 10.0], np.float32)


class Case:
    def __init__(self, model, token_lists):
        self.model = model
        self.kind, self.eps = model.config.norm_kind, model.config.norm_eps
        self.batch = gr.make_batch(token_lists)
        self.out = gr.capture_batch(model, self.batch)
        self.acts = self.out.activations

    def ln1(self, layer):
        w = self.model.blocks.ln1_w[layer]
        b = None if self.model.blocks.ln1_b is None else self.model.blocks.ln1_b[layer]
        return w, b

    def model_norm(self, layer):
        w, b = self.ln1(layer)
        return lambda z: layers.apply_norm(z, self.kind, w, b, self.eps)[0]

    def sample_points(self):
        """(layer, prompt, position) triples: first token (huge norm) and ordinary ones."""
        n = self.model.config.n_layers
        return [(0, 0, 1), (n // 2, 0, 0), (n // 2, 1, 2), (n - 1, 1, 3)]


@pytest.fixture(scope="module", params=["smollm2", "gpt2"])
def case(request, tmp_path_factory):
    if request.param == "smollm2":
        model, tok = models.load("smollm2-135m-instruct")
        return Case(model, [tok.encode(p, add_special_tokens=True) for p in PROMPTS])
    transformers = pytest.importorskip("transformers")
    from hf_tiny import save_tiny

    folder = tmp_path_factory.mktemp("gpt2_geometry")
    save_tiny(transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=97,
                                      n_positions=32), folder)
    model, _ = models.load(folder)
    rng = np.random.default_rng(0)
    return Case(model, [rng.integers(0, 97, 9).tolist(), rng.integers(0, 97, 6).tolist()])


def test_norm_kind(case):
    assert case.kind == ("rms" if case.model.config.architecture == "llama" else "layer")


def test_jacobian_equals_autodiff_of_model_norm(case):
    @jax.jit  # one compile for all sample points (eager jacfwd retraces every call)
    def both(x, w, b):
        auto = jax.jacfwd(lambda z: layers.apply_norm(z, case.kind, w, b, case.eps)[0])(x)
        return geo.norm_jacobian(x, case.kind, case.eps, gamma=w), auto

    for layer, b, s in case.sample_points():
        x = case.acts.resid_pre[b, layer, s]
        analytic, auto = both(x, *case.ln1(layer))
        scale = float(jnp.max(jnp.abs(auto)))
        err = float(jnp.max(jnp.abs(analytic - auto)))
        assert err <= 1e-5 * scale, (layer, b, s, err, scale)


def test_effective_displacement_equals_model_norm_difference(case):
    rng = np.random.default_rng(0)  # numpy: compiling jax.random costs seconds on a CPU
    for layer, b, s in case.sample_points():
        x = case.acts.resid_pre[b, layer, s]
        v = jnp.asarray(rng.standard_normal(x.shape, np.float32))
        v = 0.3 * jnp.linalg.norm(x) / jnp.linalg.norm(v) * v
        norm = case.model_norm(layer)
        w, _ = case.ln1(layer)
        diff = norm(x + v) - norm(x)  # the bias cancels
        scale = float(jnp.max(jnp.abs(norm(x))))
        with_gain = geo.effective_displacement(x, v, case.kind, case.eps, gamma=w)
        assert float(jnp.max(jnp.abs(with_gain - diff))) <= 1e-5 * scale
        # Divided by the gain: the sphere displacement itself (coordinates with a gain
        # below 1% of the largest are skipped: dividing amplifies their rounding).
        sphere = geo.effective_displacement(x, v, case.kind, case.eps)
        ok = jnp.abs(w) > 0.01 * jnp.max(jnp.abs(w))
        err = jnp.where(ok, diff / jnp.where(ok, w, 1.0) - sphere, 0.0)
        assert float(jnp.max(jnp.abs(err))) <= 1e-3 * float(jnp.max(jnp.abs(sphere))) + 1e-5


def test_logit_decomposition_sums_to_model_logits(case):
    m = case.model
    gamma, beta, bias = m.final_norm_w, m.final_norm_b, m.unembed_b
    logits = case.out.logits  # [B, seq, vocab]
    scale = float(jnp.max(jnp.abs(logits)))
    normed = case.acts.final_norm_out
    direct = jnp.einsum("bsd,vd->bsv", normed, m.W_U, precision="highest")
    if bias is not None:
        direct = direct + bias
    assert float(jnp.max(jnp.abs(direct - logits))) <= 1e-5 * scale
    xhat = geo.to_sphere(case.acts.final_norm_in, case.kind, m.config.norm_eps)
    dec = geo.decompose_logits(xhat, m.W_U, gamma, bias, beta)
    assert float(jnp.max(jnp.abs(dec.logits - logits))) <= 1e-5 * scale
    assert float(jnp.max(jnp.abs(dec.reconstruct() - logits))) <= 1e-5 * scale
    # the report's rankings start from the same decomposition and check it themselves
    x_last = case.acts.final_norm_in[jnp.arange(2), case.batch.last]
    assert float(jnp.max(gr.logit_rankings(m, x_last, (1, 5))["max_logit_err"])) <= 1e-5 * scale


def test_ln1_scale_equals_norm_divisor(case):
    divisor = geo.norm_divisor(case.acts.resid_pre, case.kind, case.eps)
    np.testing.assert_allclose(case.acts.ln1_scale, divisor, rtol=1e-6)
    final = geo.norm_divisor(case.acts.final_norm_in, case.kind, case.eps)
    np.testing.assert_allclose(case.acts.final_scale, final, rtol=1e-6)


def test_effective_cosine_of_orthogonal_pairs_matches_closed_form(case):
    layer = case.model.config.n_layers // 2
    xs = gr.non_first_positions(case.acts.resid_pre[:, layer], case.batch)
    curve = gr.effective_cosine_curve(case.model, xs, layer, RHOS, n_pairs=4, seed=1)
    assert float(jnp.max(jnp.abs(curve["storage"]))) < 1e-5  # the pairs really are orthogonal
    np.testing.assert_allclose(curve["sphere"], curve["closed"], atol=1e-5)
    if case.kind == "rms":  # eps negligible: the ideal eps = 0 form itself
        ideal = geo.orthogonal_pair_cosine_closed_form(jnp.asarray(RHOS))[:, None, None]
        np.testing.assert_allclose(curve["sphere"], jnp.broadcast_to(ideal, curve["sphere"].shape),
                                   atol=1e-5)
    # the first-order (Jacobian) effects of orthogonal pairs stay orthogonal
    assert float(jnp.max(jnp.abs(curve["first_order"]))) < 1e-5
    # lens.geometry's own effective cosine matrix agrees with the model-norm measurement
    x = xs[0]
    c = x - jnp.mean(x) if case.kind == "layer" else x
    gauss = jnp.asarray(np.random.default_rng(2).standard_normal((2, x.shape[0]), np.float32))
    pair = jnp.linalg.norm(c) * gr._orthonormal_pair(gauss, c, case.kind, True)
    cos = geo.effective_cosine_matrix(x, pair, case.kind, case.eps)[0, 1]
    t = case.eps * x.shape[0] / jnp.sum(c * c)
    np.testing.assert_allclose(cos, geo.orthogonal_pair_cosine_eps(1.0, t), atol=1e-5)


def test_closed_form_with_eps_reduces_to_ideal():
    rho = jnp.logspace(-2, 2, 41)
    np.testing.assert_allclose(geo.orthogonal_pair_cosine_eps(rho, 0.0),
                               geo.orthogonal_pair_cosine_closed_form(rho), rtol=1e-5)


def test_norm_table_and_rankings_shapes(case):
    cfg = case.model.config
    table = gr.norm_table(case.model, case.out, case.batch, (1.0, 8.0))
    assert table["median"].shape == (cfg.n_layers + 1,)
    assert table["rho"].shape == (cfg.n_layers + 1, 2)
    np.testing.assert_allclose(table["rho"][:, 1], 8.0 * table["rho"][:, 0], rtol=1e-6)
    x_last = case.acts.final_norm_in[jnp.arange(2), case.batch.last]
    r = gr.logit_rankings(case.model, x_last, (1, 5))
    assert r["overlap"].shape == (2, len(gr.SCORES), 2)
    # "dot" is the model's ranking up to the per-token constant: identical without biases
    if case.model.final_norm_b is None and case.model.unembed_b is None:
        assert float(jnp.min(r["overlap"][:, 0])) == 1.0
        np.testing.assert_allclose(r["spearman"][0], 1.0, atol=1e-6)
