"""The embedded real models against transformers' own GGUF load of the same file.

Each model is loaded once per module (ours and transformers'), then checked on:
  * logits on several prompts: top-1 identical at every position, max |diff| reported;
  * greedy generation: 32 new tokens identical (HF side: an explicit KV-cached loop);
  * the parameters of a GGUF load equal those of the same weights saved as safetensors.

Tolerance: both sides dequantise the same blocks to the same float32 weights (checked
bit for bit in test_params_gguf_equals_safetensors), so the logits differ only by float32
summation order across ~20-30 layers; measured max |diff| is ~1e-4 on logits of size ~20.
LOGIT_ATOL = 2e-3 leaves a wide margin while still catching any real misload (which moves
logits by O(1)).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import models
from lens.models.generation import generate  # a broken project import fails, never skips

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGIT_ATOL = 2e-3
N_NEW = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. Twenty years later,",
]


class Loaded:
    def __init__(self, name: str):
        from lens.models.io import embedded

        self.path = embedded.fetch(name)
        self.model, self.tokenizer = models.load(name)
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            self.path.parent, gguf_file=self.path.name, dtype=torch.float32
        ).eval()
        self._fwd = eqx.filter_jit(lambda m, t: m(t))

    def forward(self, tokens):
        return self._fwd(self.model, tokens)

    def prompt_ids(self) -> list[list[int]]:
        out = []
        for text in PROMPTS:
            ids = self.tokenizer.encode(text, add_special_tokens=True)
            out.append(ids)
        if self.tokenizer.chat_template is not None:
            chat = [{"role": "user", "content": "Name three primary colours."}]
            out.append(self.tokenizer.chat_tokens(chat))
        return out

    def hf_logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].numpy()

    def hf_greedy(self, ids: list[int], n: int) -> list[int]:
        out = []
        with torch.no_grad():
            res = self.hf(torch.tensor([ids]), use_cache=True)
            for _ in range(n):
                nxt = int(res.logits[0, -1].argmax())
                out.append(nxt)
                res = self.hf(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
        return out


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def real(request):
    loaded = Loaded(request.param)
    loaded.name = request.param
    yield loaded
    del loaded


def test_logits_match_transformers(real):
    worst = 0.0
    for ids in real.prompt_ids():
        ours = np.asarray(real.forward(jnp.asarray(ids, jnp.int32)))
        ref = real.hf_logits(ids)
        assert ours.shape == ref.shape
        diff = float(np.max(np.abs(ours - ref)))
        worst = max(worst, diff)
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1), err_msg=f"{real.name}: top-1 differs")
        assert diff < LOGIT_ATOL, f"{real.name}: max |logit diff| {diff:.3g} on {len(ids)} tokens"
    print(f"\n{real.name}: max |logit diff| vs transformers = {worst:.3g} (over {len(PROMPTS)}+ prompts)")


def test_greedy_generation_matches_transformers(real):
    prompts = real.prompt_ids()[:2]
    result = generate.generate(real.model, prompts, generate.GenerationConfig(N_NEW, eos_token_ids=()))
    for ids, ours in zip(prompts, result.tokens):
        ref = real.hf_greedy(ids, N_NEW)
        assert list(ours) == ref, (
            f"{real.name}: greedy continuations differ\nours: {real.tokenizer.decode(ours)!r}\n"
            f"hf:   {real.tokenizer.decode(ref)!r}"
        )


def test_params_gguf_equals_safetensors(real, tmp_path):
    """transformers' GGUF load saved as safetensors, read by our folder loader, gives the
    very same parameters as our GGUF reader (one converter serves both)."""
    import chex

    from safetensors.numpy import save_file

    # save_pretrained refuses a GGUF-loaded ("quantized") model, so write the folder by hand.
    import json

    cfg = real.hf.config.to_dict()
    # Bookkeeping fields transformers adds to a GGUF-derived config (no effect on the forward).
    for key in ("_model_name_or_path", "unk_token_id"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.numpy() for k, v in real.hf.state_dict().items()}, tmp_path / "model.safetensors")
    from_folder, tok = models.load(tmp_path)
    assert tok is None  # the folder has no tokenizer files
    chex.assert_trees_all_equal(
        jax.tree_util.tree_leaves(from_folder), jax.tree_util.tree_leaves(real.model)
    )
    assert from_folder.config == real.model.config


def test_chat_prompt_decodes_back(real):
    if real.tokenizer.chat_template is None:
        pytest.skip("base model: no chat template")
    chat = [{"role": "user", "content": "Hi there"}]
    text = real.tokenizer.apply_chat_template(chat)
    assert real.tokenizer.decode(real.tokenizer.chat_tokens(chat)) == text
