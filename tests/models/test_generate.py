"""Generation: cached decode == full forward, greedy == transformers, padding, sampling.

Tolerance 1e-5 on logits: the cached decode computes the same float32 sums as the full
forward, but over a different number of query rows and key slots (empty slots add an
exact 0 after the softmax), so XLA may block and order the reductions differently.  At
these sizes (d_model 48, logits of order 1) reordering costs a few ulps, ~1e-7; 1e-5
leaves headroom while any real error (a wrong position, a leaked padding key, a stale
cache slot) moves logits by >1e-2.
"""

from __future__ import annotations

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import save_tiny

from lens.models import Edits
from lens.models.families import convert_hf
from lens.models.generation.generate import GenerationConfig, chat_prompt, generate
from lens.models.runtime.progress import Progress
from lens.models.io.safetensors_reader import read_safetensors_folder

VOCAB, EOS, N_NEW = 101, 7, 10
PROMPT_LENS = (5, 9, 3)


def _tiny_config(family: str):
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(
            hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5,
            tie_word_embeddings=False, **common,
        )
    return GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, **common)


FAMILIES = ["llama", "gpt2"]
_BUILT: dict[str, tuple] = {}


def _build(family: str, tmp_path_factory):
    """(our model, the HF model, prompts, greedy batched result with logits), built once."""
    if family not in _BUILT:
        folder = tmp_path_factory.mktemp(f"gen_{family}")
        hf = save_tiny(_tiny_config(family), folder)
        model = convert_hf(*read_safetensors_folder(folder), jnp.float32)
        rng = np.random.RandomState(0)
        prompts = [rng.randint(8, VOCAB, size=n).tolist() for n in PROMPT_LENS]  # no EOS inside
        result = generate(model, prompts, GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True))
        _BUILT[family] = (model, hf, prompts, result)
    return _BUILT[family]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build("llama", tmp_path_factory)


@eqx.filter_jit
def _forward_padded(model, tokens, mask, edits):
    return jax.vmap(lambda t, m: model(t, attention_mask=m, edits=edits))(tokens, mask)


def full_logits(model, sequences, edits=None) -> list[np.ndarray]:
    """The uncached forward of each sequence (right-padded into one compiled call; causal
    attention makes the padding after a sequence irrelevant to it)."""
    n = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), n), np.int32)
    mask = np.zeros((len(sequences), n), bool)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], mask[i, : len(s)] = s, True
    out = np.asarray(_forward_padded(model, jnp.asarray(tokens), jnp.asarray(mask), edits))
    return [out[i, : len(s)] for i, s in enumerate(sequences)]


def test_result_shapes(tiny):
    model, _, prompts, r = tiny
    assert len(r.tokens) == len(r.sequences) == len(r.logits) == len(prompts)
    for p, new, seq, lg in zip(prompts, r.tokens, r.sequences, r.logits):
        assert len(new) == N_NEW and seq == p + new
        chex.assert_shape(lg, (N_NEW, model.config.vocab_size))
    assert r.finished == [False] * len(prompts)


def test_cached_decode_equals_full_forward(tiny):
    """Each step's logits (prefill for step 0, cached decode after) == the full forward."""
    model, _, prompts, r = tiny
    for p, full, logits in zip(prompts, full_logits(model, r.sequences), r.logits):
        np.testing.assert_allclose(logits, full[len(p) - 1 : -1], rtol=0, atol=1e-5)


def test_greedy_equals_transformers(tiny):
    _, hf, prompts, r = tiny
    for p, new in zip(prompts, r.tokens):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
                eos_token_id=None, pad_token_id=0,
            )
        assert ref[0, len(p):].tolist() == new


def test_batch_with_left_padding_equals_alone(llama):
    """Prompts padded by 11 and 13 in the batch (to 16) vs by 3 and 5 alone (to 8)."""
    model, _, prompts, r = llama
    for i in (0, 2):
        alone = generate(model, prompts[i], GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True))
        assert alone.tokens[0] == r.tokens[i]
        np.testing.assert_allclose(alone.logits[0], r.logits[i], rtol=0, atol=1e-5)


def test_sampling_deterministic_and_top_k_1_is_greedy(llama):
    model, _, prompts, r = llama
    kw = dict(eos_token_ids=[], temperature=1.3, top_k=20, top_p=0.9)
    a = generate(model, prompts, GenerationConfig(N_NEW, seed=3, **kw))
    b = generate(model, prompts, GenerationConfig(N_NEW, seed=3, **kw), progress=Progress(True, chunk=4))
    c = generate(model, prompts, GenerationConfig(N_NEW, seed=4, **kw))
    assert a.tokens == b.tokens  # same seed, also when decoded in chunks
    assert a.tokens != c.tokens
    assert a.tokens != r.tokens  # it really sampled
    one = generate(model, prompts, GenerationConfig(N_NEW, eos_token_ids=(), temperature=0.7, top_k=1, seed=9))
    assert one.tokens == r.tokens


def test_top_p_tiny_is_greedy(llama):
    model, _, prompts, r = llama
    out = generate(model, prompts, GenerationConfig(N_NEW, eos_token_ids=(), temperature=2.0, top_k=20, top_p=1e-6,
                                                    seed=1))
    assert out.tokens == r.tokens


def test_eos_cuts_each_row(llama):
    model, _, prompts, r = llama
    eos = r.tokens[0][3]  # a token prompt 0 emits at step 3 (maybe earlier too)
    out = generate(model, prompts, GenerationConfig(N_NEW, eos_token_ids=[eos], return_logits=True))
    for full, new, done in zip(r.tokens, out.tokens, out.finished):
        if eos in full:
            assert new == full[: full.index(eos) + 1] and done
        else:
            assert new == full and not done
    # Default stop ids are the config's.
    assert model.config.eos_token_ids == (EOS,)
    default = generate(model, prompts, GenerationConfig(N_NEW, return_logits=True))
    for full, new in zip(r.tokens, default.tokens):
        assert new == (full[: full.index(EOS) + 1] if EOS in full else full)


def test_steering_equals_full_forward_with_same_edits(llama):
    """S=1 edits at every prompt and generated position == the full forward with them."""
    model, _, prompts, r = llama
    c = model.config
    add = 3.0 * jax.random.normal(jax.random.key(0), (c.n_layers, 1, c.d_model))
    edits = Edits(resid_add=add)
    out = generate(model, prompts, GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True), edits=edits)
    assert out.tokens != r.tokens  # the edit matters
    for p, full, logits in zip(prompts, full_logits(model, out.sequences, edits), out.logits):
        np.testing.assert_allclose(logits, full[len(p) - 1 : -1], rtol=0, atol=1e-5)
    # Steering only the generated tokens: the first token comes from the plain prompt.
    gen_only = generate(model, prompts, GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True), edits=edits,
                        steer_prompt=False)
    for lg, ref in zip(gen_only.logits, r.logits):
        np.testing.assert_allclose(lg[0], ref[0], rtol=0, atol=1e-5)


def test_batched_edits_equal_separate(llama):
    """One steering vector per prompt (edits_batched) == each vector shared by the batch."""
    model, _, prompts, _ = llama
    c = model.config
    adds = 3.0 * jax.random.normal(jax.random.key(1), (len(prompts), c.n_layers, 1, c.d_model))
    config = GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True)
    both = generate(model, prompts, config, edits=Edits(resid_add=adds), edits_batched=True)
    for k in range(len(prompts)):
        shared = generate(model, prompts, config, edits=Edits(resid_add=adds[k]))
        assert both.tokens[k] == shared.tokens[k]
        np.testing.assert_allclose(both.logits[k], shared.logits[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompts=[]), ValueError, "no prompts"),
        (dict(prompts=[[1, 2], []]), ValueError, "prompt 1 is empty"),
        (dict(prompts=[1, VOCAB]), ValueError, "out of range"),
        (dict(prompts=[[-1, 2]]), ValueError, "out of range"),
        (dict(prompts="hello"), TypeError, "not text"),
        (dict(prompts=[[1.5, 2.0]]), TypeError, "integer"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(prompts=[[1] * 60]), ValueError, "exceeds the model's context of 64"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(edits=Edits(resid_add=jnp.zeros((2, 3, 48)))), ValueError, "position axis S = 1"),
        (dict(edits=Edits(resid_add=jnp.zeros((5, 1, 48)))), ValueError, "layer axis of 2"),
        (dict(edits=Edits(resid_add=jnp.zeros((2, 1, 48))), edits_batched=True), ValueError,
         "leading axis of 1"),
    ],
)
def test_bad_input(llama, kwargs, error, match):
    """Config errors are raised when the GenerationConfig is built, the rest by generate."""
    model = llama[0]
    args = dict(prompts=[1, 2, 3], max_new_tokens=5) | kwargs
    steer = {k: args.pop(k) for k in ("edits", "edits_batched") if k in args}
    with pytest.raises(error, match=match):
        generate(model, args.pop("prompts"), GenerationConfig(**args), **steer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(top_k=1.5), "top_k"),
        (dict(seed="0"), "seed"),
        (dict(eos_token_ids=["2"]), "eos_token_ids"),
        (dict(pad_token_id=1.0), "pad_token_id"),
    ],
)
def test_config_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**(dict(max_new_tokens=5) | kwargs))


def test_config_and_progress_types():
    assert GenerationConfig(3, eos_token_ids=2).eos_token_ids == (2,)
    assert GenerationConfig(3, eos_token_ids=[4, 5]).eos_token_ids == (4, 5)
    with pytest.raises(TypeError, match="GenerationConfig"):
        generate(None, [[1]], 5)
    with pytest.raises(ValueError, match="chunk"):
        Progress(True, chunk=0)
    with pytest.raises(TypeError, match="progress"):
        Progress.of("yes")
    assert Progress.of(True) == Progress(enabled=True) and Progress.of(None) == Progress()


class _FakeTokenizer:
    """Just the two methods chat_prompt uses (models/io/tokenizer.py has the real ones)."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return [ord(ch) for ch in text]


def test_chat_prompt():
    tok = _FakeTokenizer()
    assert chat_prompt(tok, "hi") == [ord(c) for c in "<user>hi</s><assistant>"]
    ids = chat_prompt(tok, "hi", system="be brief")
    assert ids == [ord(c) for c in "<system>be brief</s><user>hi</s><assistant>"]
