"""Every tool on a model split over a mesh equals its single-device result: 8 faked CPU
devices, meshes (8, 1), (2, 4) and (1, 8) of (data, model), one subprocess for all of
them (XLA_FLAGS must be set before JAX starts) and a tiny model to keep it quick.

Covered: forward, run_with_cache, Edits (add_vectors), sweeps (on the model's mesh),
greedy generation with its KV cache, activation patching, attribution patching, batched
MELBO training (automatic mesh, and `MelboRunConfig(mesh=<the model mesh>)`), causal
scrubbing (2 seeds), the modularity statistics (pruning's activation_stats and
neuron_scores, MoEfication's co-activation counts) and the trainer (`TrainOptions(mesh=)`:
4 AdamW steps, batches over "data", weights over "model", optimiser state sharded like the
params, checked leaf by leaf).  Tolerance 1e-5 (float32 sums split across devices
reassociate; a layout bug moves results by O(1)), relative to max(1, |reference|) for the
ratios and counts; MELBO's vectors after 5 Adam steps: 1e-4 of their norm; the trainer:
its loss curve 1e-5 relative, its final params 1e-4 of their norm.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one 8-device subprocess compiling every tool for 3 meshes

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, tempfile
import lens
import equinox as eqx, jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh
from lens import models
from lens.circuits import scrubbing as S
from lens.circuits.scrubbing_examples import masked_nll
from lens.modularity import pruning, moefication
from lens.training.train import TrainConfig, TrainOptions, train
from lens.models.core.config import ModelConfig
from lens.models.generation.generate import GenerationConfig, generate
from lens.circuits import patching, attribution
from lens.steering import melbo
assert jax.device_count() == 8
c = ModelConfig(architecture="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, d_head=4,
                d_mlp=64, max_seq_len=32, norm_kind="rms", norm_eps=1e-5, activation="silu", gated_mlp=True,
                positional="rope", tie_embeddings=False, eos_token_ids=())
folder = models.save(models.init(c, jax.random.key(0)), tempfile.mkdtemp())
rng = np.random.RandomState(0)
toks = rng.randint(0, 64, size=(4, 8)).astype(np.int32)
corrupt = rng.randint(0, 64, size=(4, 8)).astype(np.int32)
vecs = rng.randn(8, 32).astype(np.float32)
data = rng.randint(0, 64, size=(16, 8)).astype(np.int32)
scrub_targets = {"next": np.roll(data, -1, axis=1), "mask": np.tile((np.arange(8) < 7).astype(np.float32), (16, 1))}
hyp = S.Node(S.Output(), children=(S.Node(S.Head(1, 2), children=(S.Node(S.HeadInput(1, 2, "k"), children=(
    S.Node(S.Head(0, 0)),)),)), S.Node(S.MLP(0))))
train_rows = rng.randint(0, 64, size=(64, 9)).astype(np.int32)
train_cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=1, eval_batches=1)
RELATIVE = {"neuron_scores", "coactivation", "melbo", "melbo_mesh", "train_loss", "train_params"}

one_device = models.make_mesh(data=1, model=1, devices=jax.devices()[:1])  # the reference runs on one device


def tools(model, mesh):
    out = {}
    out["forward"] = np.asarray(jax.vmap(model)(toks))
    logits, cache = lens.run_with_cache(model, toks)
    out["run_with_cache"] = np.concatenate([np.asarray(cache.resid_post).ravel(), np.asarray(cache.head_z).ravel()])
    out["add_vectors"] = np.asarray(lens.add_vectors(model, toks[0], vecs, layer=1, coeff=2.0))
    cfg = lens.SweepConfig(mesh=mesh, chunk_size=8, progress=False, keep_logits=True)
    res = lens.sweep_vectors(model, toks, vecs, layers=[1], coeffs=[3.0], targets=[1, 2], config=cfg)
    out["sweep"] = np.concatenate([np.asarray(res.kl).ravel(), np.asarray(res.logits).ravel()])
    gen = generate(model, [list(toks[0][:5]), list(toks[1])], GenerationConfig(max_new_tokens=6, return_logits=True))
    out["generate"] = np.concatenate([np.asarray(gen.tokens, np.float32).ravel(), np.concatenate([np.ravel(l) for l in gen.logits])])
    metric = patching.logit_diff_metric(3, 5)
    out["activation_patching"] = np.asarray(patching.activation_patching(model, toks, corrupt, metric, site="resid"))
    out["attribution_patching"] = np.asarray(attribution.attribution_patching(model, toks, corrupt, metric, site="resid"))
    tokens, mask = melbo.pad_prompts([list(toks[0]), list(toks[1][:5])])
    problem = melbo.make_problem(model, tokens, mask, 0, 1)
    r = melbo.melbo(problem, 4, melbo.MelboConfig(radius=4.0, steps=5, lr=0.01),
                    run=melbo.MelboRunConfig(mode="batched", block_size=4, seed=3))
    out["melbo"] = np.asarray(r.vectors)
    r = melbo.melbo(problem, 8, melbo.MelboConfig(radius=4.0, steps=5, lr=0.01),
                    run=melbo.MelboRunConfig(mode="batched", block_size=8, seed=3, mesh=mesh or one_device))
    out["melbo_mesh"] = np.asarray(r.vectors)
    out["scrubbing"] = S.scrub(model, data, hyp, masked_nll, scrub_targets, seeds=(0, 1)).losses.ravel()
    st = pruning.activation_stats(model, data, chunk=8)
    out["activation_stats"] = np.concatenate([st.neurons.ravel(), st.head_z.ravel()])
    out["neuron_scores"] = pruning.neuron_scores(model, data[:8], data[8:], chunk=4).ravel()
    out["coactivation"] = moefication.coactivation(model, data, chunk=4).ravel()
    trained = train(model, train_rows, train_rows[:8], train_cfg, tempfile.mkdtemp(), TrainOptions(mesh=mesh))
    out["train_loss"] = np.array([[x["train_loss"], x["val_loss"]] for x in trained.log])
    params = eqx.filter(trained.model, eqx.is_array)
    out["train_params"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    if mesh is not None:  # the layout: params as models.shard places them, Adam's mu / nu like the params
        placed = jax.tree.leaves(eqx.filter(models.shard(ref, mesh), eqx.is_array))
        mu, nu = (jax.tree.leaves(optax.tree_utils.tree_get(trained.opt_state, k)) for k in ("mu", "nu"))
        leaves = jax.tree.leaves(params)
        assert len(leaves) == len(placed) == len(mu) == len(nu) > 0
        for p, want_p, m, v in zip(leaves, placed, mu, nu):
            assert p.sharding.is_equivalent_to(want_p.sharding, p.ndim), (p.sharding, want_p.sharding)
            assert m.sharding == p.sharding and v.sharding == p.sharding, (p.sharding, m.sharding, v.sharding)
        if dict(mesh.shape)["model"] > 1:
            assert params.blocks.W_in.sharding.spec[2] == "model", params.blocks.W_in.sharding
    return out

ref = models.load(folder)[0]
want = tools(ref, None)
for bad in (Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "heads")),):
    for call in (lambda: melbo.MelboRunConfig(mesh=bad) and melbo.block_mesh(bad, 8),
                 lambda: train(ref, train_rows, train_rows[:8], train_cfg, tempfile.mkdtemp(), TrainOptions(mesh=bad))):
        try:
            call()
            raise AssertionError("an unknown mesh axis name was accepted")
        except ValueError as e:
            assert "heads" in str(e), e
errors = {}
for shape in [(8, 1), (2, 4), (1, 8)]:
    mesh = models.make_mesh(data=shape[0], model=shape[1])
    model, _ = models.load(folder, mesh=mesh)
    got = tools(model, mesh)
    for k in want:
        if k == "train_params":
            scale = float(np.linalg.norm(want[k]))
        else:
            scale = max(1.0, float(np.abs(want[k]).max())) if k in RELATIVE else 1.0
        errors[f"{k} {shape}"] = float(np.abs(got[k] - want[k]).max()) / scale
print("RESULT" + json.dumps(errors))
"""


def test_every_tool_under_a_mesh_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    errors = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    print(errors)
    assert len(errors) == 15 * 3
    for name, err in errors.items():
        assert err < (1e-4 if name.startswith(("melbo", "train_params")) else 1e-5), (name, err)
