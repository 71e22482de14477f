"""OLMo 2, Mixtral and OLMoE against transformers (PyTorch CPU) on tiny random models.

Each model is a tiny random transformers model saved with save_pretrained and read back
with `models.load(folder)`.  Awkward settings: head_dim != d_model / heads (OLMo 2,
Mixtral), grouped-query attention, k = 2 of 6 experts, top-k probabilities renormalised
(Mixtral, OLMoE norm_topk_prob=True) and not (OLMoE's default), Mixtral's sliding window
(5) shorter than the sequence (16).

Tolerance 1e-5 absolute on logits, every layer's residual and router logits (float32
against float32 with other summation orders; logits are O(1) with initializer_range 0.1;
measured at most ~2e-6).  The plain-config checks (transformers' defaults, initializer
0.02, no randomised norms) use 1e-4, the bar a user's own checkpoint has to meet.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from hf_tiny import hf_forward, hooked, pre_edit, save_tiny
from lens import models
import lens
from lens.core import edits as E
from lens.models import Capture, Edits
from lens.models.generation.generate import GenerationConfig, generate

TOL = 1e-5
VOCAB, SEQ = 97, 16
RNG = np.random.RandomState(3)
TOKENS = RNG.randint(0, VOCAB, SEQ)
OTHER = RNG.randint(0, VOCAB, SEQ)

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
VARIANTS = {
    "olmo2": lambda: tf.Olmo2Config(**COMMON, intermediate_size=48, head_dim=12),
    "olmo2_bias_tied": lambda: tf.Olmo2Config(**COMMON, intermediate_size=48, attention_bias=True,
                                              tie_word_embeddings=True),
    "mixtral": lambda: tf.MixtralConfig(**COMMON, intermediate_size=24, head_dim=12,
                                        num_local_experts=6, num_experts_per_tok=2),
    "mixtral_window": lambda: tf.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6,
                                               num_experts_per_tok=2, sliding_window=5),
    "olmoe": lambda: tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=6,
                                    num_experts_per_tok=2),
    "olmoe_norm_topk": lambda: tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=6,
                                              num_experts_per_tok=3, norm_topk_prob=True,
                                              attention_bias=True),
}
_BUILT: dict = {}


def built(name: str, tmp_path_factory):
    """(hf model, our model, folder), built once per process."""
    if name not in _BUILT:
        folder = tmp_path_factory.mktemp(name)
        hf = save_tiny(VARIANTS[name](), folder)
        model, _ = models.load(folder)
        _BUILT[name] = (hf, model, folder)
    return _BUILT[name]


CAPTURE = Capture(resid=True, sublayers=True, neurons=True, router=True)


@eqx.filter_jit
def _forward(model, tokens, edits):
    out = model.forward(tokens, edits=edits, capture=CAPTURE)
    return out.logits, out.activations


def run(model, tokens=TOKENS, edits: Edits | None = None):
    """(logits, activations) with `edits` made uniform: every field these tests use is
    present (zeros where unset: nothing added, no direction removed, mix 0) at full
    position length, so ONE compiled forward per model serves every edit here."""
    c = model.config
    n, d, S = c.n_layers, c.d_model, SEQ
    units = (c.n_experts, c.d_mlp) if c.is_moe else (c.d_mlp,)
    site = "expert_neuron" if c.is_moe else "neuron"
    shapes = {"resid_add": (n, S, d), "head_mix": (n, S, c.n_heads),
              f"{site}_mix": (n, S) + units, f"{site}_source": (n, S) + units}
    e = Edits() if edits is None else edits
    E.check_edits(model, edits, S)
    out = {k: jnp.zeros(v) if getattr(e, k) is None else jnp.broadcast_to(getattr(e, k), v)
           for k, v in shapes.items()}
    for k in ("resid_ablate", "writer_ablate"):  # one direction at most here
        out[k] = jnp.zeros((n, 1, d)) if getattr(e, k) is None else getattr(e, k)
    return _forward(model, jnp.asarray(tokens, jnp.int32), Edits(**out))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_residuals_and_router_match_transformers(name, tmp_path_factory):
    hf, model, _ = built(name, tmp_path_factory)
    ours, acts = run(model)
    logits, hidden = hf_forward(hf, TOKENS)
    np.testing.assert_allclose(np.asarray(ours), logits, atol=TOL, rtol=0)
    # hidden_states[l] (l < n_layers) enters block l; the last one is after the final norm
    n = model.config.n_layers
    np.testing.assert_allclose(np.asarray(acts.resid_pre), hidden[:n], atol=TOL, rtol=0)
    if not model.config.is_moe:
        assert acts.router_logits is None
        return
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(TOKENS[None]), output_router_logits=True).router_logits
    ref = np.stack([r.float().numpy() for r in ref])  # [layers, seq, experts]
    np.testing.assert_allclose(np.asarray(acts.router_logits), ref, atol=TOL, rtol=0)
    # chosen experts are the top-k of the router; the weights sum to 1 only when renormalised
    k = model.config.experts_per_token
    order = np.argsort(-ref, axis=-1)[..., :k]
    np.testing.assert_array_equal(np.asarray(acts.chosen_experts), order)
    sums = np.asarray(acts.expert_weights).sum(-1)
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.take_along_axis(probs, order, -1).sum(-1)
    expected = np.ones_like(top) if model.config.norm_topk_prob else top
    np.testing.assert_allclose(sums, expected, atol=1e-6)
    assert model.config.norm_topk_prob or sums.max() < 0.999  # unrenormalised: weights < 1


def test_sliding_window_binds(tmp_path_factory):
    """Mixtral's window 5 < 16 tokens changes the logits (so the match above means the
    window is applied, not that it is irrelevant)."""
    import dataclasses

    _, model, _ = built("mixtral_window", tmp_path_factory)
    assert model.config.sliding_window == 5
    full = dataclasses.replace(model, config=dataclasses.replace(model.config, local_layers=None,
                                                                 sliding_window=None))
    diff = np.abs(np.asarray(run(model)[0]) - np.asarray(run(full)[0]))
    assert diff[:5].max() < TOL and diff[5:].max() > 1e-3


PLAIN = {  # small sizes, transformers' defaults for everything else
    "olmo2": lambda: tf.Olmo2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4),
    "mixtral": lambda: tf.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2),
    "olmoe": lambda: tf.OlmoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16,
                                    num_hidden_layers=2, num_attention_heads=4),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_configs_load(name, tmp_path):
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(PLAIN[name]()).float().eval()
    hf.save_pretrained(tmp_path)
    model, _ = models.load(tmp_path)
    assert model.config.architecture == name
    logits, _ = hf_forward(hf, TOKENS)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [pytest.param("olmo2", marks=pytest.mark.slow), "mixtral_window",
                                  pytest.param("olmoe", marks=pytest.mark.slow)])
def test_greedy_generation_equals_transformers(name, tmp_path_factory):
    """32 new tokens (past Mixtral's window of 5), through our KV cache."""
    hf, model, _ = built(name, tmp_path_factory)
    prompt = TOKENS[:6].tolist()
    ours = generate(model, [prompt], GenerationConfig(32, eos_token_ids=())).tokens[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=32, min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert ref[0, len(prompt):].tolist() == ours
    if name == "olmoe":  # the KV-cached decode's logits equal the full forward's
        r = generate(model, [prompt], GenerationConfig(32, eos_token_ids=(), return_logits=True))
        full = np.asarray(model(jnp.asarray(r.sequences[0])))
        np.testing.assert_allclose(r.logits[0], full[len(prompt) - 1:-1], atol=TOL, rtol=0)


# ------------------------------------------------------------------ edits vs forward hooks
def _layers(hf):
    return hf.model.layers


@pytest.mark.parametrize("name", ["olmo2", "mixtral", "olmoe"])
def test_steering_head_ablation_and_writers_match_hooks(name, tmp_path_factory):
    hf, model, _ = built(name, tmp_path_factory)
    c = model.config
    layer, head = 1, 2
    v = np.random.RandomState(1).randn(c.d_model).astype(np.float32)
    # steering: v added to the residual entering block `layer` (a pre-hook on that layer)
    ours = run(model, edits=E.add(model, v, layer, coeff=2.0))[0]
    ref = hooked(hf, [(_layers(hf)[layer], "pre_", pre_edit(lambda x: x + 2.0 * torch.tensor(v)))],
                 TOKENS)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    # zero-ablating a head = zeroing its slice of o_proj's input
    dh = c.d_head

    def drop_head(x):
        x = x.clone()
        x[..., head * dh:(head + 1) * dh] = 0
        return x

    ours = run(model, edits=E.ablate_heads(model, {layer: [head]}))[0]
    ref = hooked(hf, [(_layers(hf)[layer].self_attn.o_proj, "pre_", pre_edit(drop_head))], TOKENS)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    # writer ablation: the direction projected out of the embedding and of what each block
    # adds (OLMo 2: the post-norms' outputs; the MoE families: o_proj and the MoE block)
    u = v / np.linalg.norm(v)
    ut = torch.tensor(u)
    proj = lambda m, a, out: out - (out @ ut)[..., None] * ut  # noqa: E731
    writers = [hf.model.embed_tokens]
    for L in _layers(hf):
        writers += ([L.post_attention_layernorm, L.post_feedforward_layernorm] if name == "olmo2"
                    else [L.self_attn.o_proj, L.mlp])
    ours = run(model, edits=E.ablate_direction(model, u, where="writers"))[0]
    ref = hooked(hf, [(w, "", proj) for w in writers], TOKENS)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    base = np.asarray(run(model)[0])
    assert np.abs(np.asarray(ours) - base).max() > 1e-3


def test_olmo2_neuron_ablation_matches_hook(tmp_path_factory):
    hf, model, _ = built("olmo2", tmp_path_factory)
    idx = [3, 17, 40]

    def drop(x):
        x = x.clone()
        x[..., idx] = 0
        return x

    ours = run(model, edits=E.ablate_neurons(model, {0: idx}))[0]
    ref = hooked(hf, [(_layers(hf)[0].mlp.down_proj, "pre_", pre_edit(drop))], TOKENS)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def _eager_experts(hf):
    """Run transformers' experts with its per-expert loop (act_fn called once per expert
    hit, in increasing expert order), so a hook can tell the experts apart."""
    hf.config._experts_implementation = "eager"
    for L in _layers(hf):
        L.mlp.experts.config._experts_implementation = "eager"


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_expert_neuron_capture_and_ablation_match_hooks(name, tmp_path_factory):
    hf, model, _ = built(name, tmp_path_factory)
    _eager_experts(hf)
    c = model.config
    layer = 1
    _, cache = run(model)
    assert cache.neurons is None
    chosen = np.asarray(cache.chosen_experts[layer])
    expert = int(np.bincount(chosen.ravel(), minlength=c.n_experts).argmax())  # a busy expert
    neurons = [1, 5, 20]
    # capture: every expert's act(gate) * up from transformers' own MoE input and weights
    seen = []
    experts = _layers(hf)[layer].mlp.experts
    hooked(hf, [(experts, "pre_", lambda m, a: seen.append(a[0].clone()))], TOKENS)
    h = seen[0]
    gate_up = experts.gate_up_proj.detach()
    g, up = (h @ gate_up[expert].T).chunk(2, dim=-1)
    ref_neurons = (torch.nn.functional.silu(g) * up).numpy()
    np.testing.assert_allclose(np.asarray(cache.expert_neurons[layer, :, expert]), ref_neurons,
                               atol=TOL, rtol=0)
    # ablation: zero those neurons of that expert = zero its act_fn output's columns on the
    # call for that expert (the loop visits the experts hit, in increasing order)
    calls, hit = [], []

    def record_hit(m, a):
        idx = a[1]
        hit[:] = sorted(set(idx.flatten().tolist()) - {c.n_experts})

    def drop(m, a, out):
        calls.append(None)
        if hit[len(calls) - 1] == expert:
            out = out.clone()
            out[..., neurons] = 0
        return out

    ref = hooked(hf, [(experts, "pre_", record_hit), (experts.act_fn, "", drop)], TOKENS)
    ours = run(model, edits=E.ablate_expert_neurons(model, {layer: {expert: neurons}}))[0]
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    assert np.abs(np.asarray(ours) - np.asarray(run(model)[0])).max() > 1e-4
    # mean ablation from a batch of caches: the source is the mean over batch and positions
    other = run(model, OTHER)[1]
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), cache, other)
    e = E.ablate_expert_neurons(model, {layer: {expert: neurons}}, kind="mean", cache=batch)
    mean = np.asarray(batch.expert_neurons)[:, layer].mean(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(e.expert_neuron_source)[layer, 0], mean, atol=1e-6)


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_expert_neuron_patch_uses_source_neurons_with_own_routing(name, tmp_path_factory):
    """Patching every expert neuron of one layer from another run: that layer's MLP output
    is sum_e w_run[e] * (n_source[e] @ W_out[e]) with THIS run's router weights (numpy)."""
    _, model, _ = built(name, tmp_path_factory)
    layer = 0
    _, src = run(model, OTHER)
    e = E.patch(model, src, site="expert_neurons", layers=[layer])
    assert e.expert_neuron_mix.shape == (2, SEQ, 6, model.config.d_mlp)
    _, patched = run(model, TOKENS, e)
    w = np.asarray(patched.expert_weights[layer], np.float64)
    n_src = np.asarray(src.expert_neurons[layer], np.float64)
    w_out = np.asarray(model.blocks.W_out_experts[layer], np.float64)
    expected = np.einsum("se,sem,emd->sd", w, n_src, w_out)
    np.testing.assert_allclose(np.asarray(patched.mlp_out[layer]), expected, atol=TOL)
    np.testing.assert_allclose(np.asarray(patched.expert_neurons[layer]), n_src, atol=1e-6)


def test_add_vectors_on_moe(tmp_path_factory):
    """lens.add_vectors (the prefix once, K steered suffixes vmapped) unchanged on a MoE."""
    _, model, _ = built("olmoe", tmp_path_factory)
    vs = np.random.RandomState(2).randn(2, model.config.d_model).astype(np.float32)
    got = np.asarray(lens.add_vectors(model, TOKENS, vs, layer=1, coeff=1.5))
    for k in range(2):
        one = run(model, edits=E.add(model, vs[k], 1, coeff=1.5))[0]
        np.testing.assert_allclose(got[k], np.asarray(one), atol=TOL, rtol=0)


@pytest.mark.slow
def test_sweep_vectors_on_moe(tmp_path_factory):
    """sweep_vectors' KL equals the KL computed from add_vectors' logits."""
    _, model, _ = built("olmoe", tmp_path_factory)
    vs = np.random.RandomState(2).randn(2, model.config.d_model).astype(np.float32)
    res = lens.sweep_vectors(model, TOKENS[None], vs, coeffs=(1.5,), layers=1)
    steered = np.asarray(lens.add_vectors(model, TOKENS, vs, layer=1, coeff=1.5), np.float64)
    base = np.asarray(run(model)[0], np.float64)
    logp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)  # noqa: E731
    ls, lb = logp(steered[:, -1]), logp(base[-1])
    kl = (np.exp(ls) * (ls - lb)).sum(-1)  # KL(steered || unsteered) at the last token, [K]
    got = np.asarray(res.kl)
    assert got.shape == (2, 1, 1, 1) and kl.min() > 1e-4
    np.testing.assert_allclose(got.reshape(2), kl, atol=1e-5)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name, field, value, match", [
    ("mixtral", "router_type", "expert_choice", "router_type"),
    ("mixtral", "router_jitter_noise", 0.1, "router_jitter_noise"),
    ("olmoe", "clip_qkv", 8.0, "clip_qkv"),
    ("olmoe", "norm_topk_prob", "yes", "norm_topk_prob"),
    ("olmoe", "num_experts_per_tok", 9, "num_experts_per_tok"),
    ("olmo2", "sliding_window", 4, "sliding_window"),
    ("olmo2", "rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "yarn"),
])
def test_unknown_fields_and_options_are_refused(name, field, value, match, tmp_path_factory):
    import json

    _, _, folder = built(name, tmp_path_factory)
    hf_config = json.loads((folder / "config.json").read_text())
    from lens.models.families import family_module

    hf_config[field] = value
    with pytest.raises(ValueError, match=match):
        family_module(hf_config).config_from_hf(hf_config)


def test_expert_sites_refused_where_absent(tmp_path_factory):
    _, dense, _ = built("olmo2", tmp_path_factory)
    _, moe, _ = built("mixtral", tmp_path_factory)
    c = moe.config
    with pytest.raises(ValueError, match="no dense MLP neurons"):
        lens.run_with_cache(moe, TOKENS, edits=Edits(neuron_mix=jnp.ones((2, 1, c.d_mlp))))
    with pytest.raises(ValueError, match="no experts"):
        E.check_edits(dense, Edits(expert_neuron_mix=jnp.ones((2, 1, 1, 48))), SEQ)
    with pytest.raises(ValueError, match="pre_norms"):
        E.check_edits(dense, Edits(ln1_scale_mix=jnp.ones((2, 1))), SEQ)
    with pytest.raises(ValueError, match="mixture of experts"):
        E.ablate_expert_neurons(dense, {0: {0: [1]}})
    with pytest.raises(ValueError, match="expert 6 out of range"):
        E.ablate_expert_neurons(moe, {0: {6: [1]}})


@pytest.mark.parametrize("name", ["olmo2", "mixtral_window"])
def test_save_and_load_round_trip(name, tmp_path_factory, tmp_path):
    """models.save writes these in the native format (no HF writer); loading gives the
    same model back."""
    _, model, _ = built(name, tmp_path_factory)
    models.save(model, tmp_path)
    again, _ = models.load(tmp_path)
    assert again.config == model.config
    np.testing.assert_array_equal(np.asarray(run(again)[0]), np.asarray(run(model)[0]))
