"""lens.steering.prompts and lens.steering.melbo.base_vector (theta0 of the main job and of
scripts/modularity.py) against independent computations: the last-token CAA from the
transformers model's own hidden states, and theta0's norm rule by hand."""

import numpy as np
import pytest

from lens.steering import prompts, vectors
from lens.steering.melbo import base_vector
from lens_tiny import tiny


def test_prompt_sets_and_random_prompts():
    assert len(prompts.CODE) == len(prompts.PROSE) == 8 and len(prompts.NEUTRAL) == 4
    make = prompts.random_prompt_maker(61)
    a, b = make(prompts.NEUTRAL[0]), make(prompts.NEUTRAL[1])
    assert a == make(prompts.NEUTRAL[0])  # deterministic (seeded by the text)
    assert 8 <= len(a) <= 20 and all(0 <= i < 61 for i in a) and a != b
    with pytest.raises(ValueError, match="vocab"):
        prompts.random_prompt_maker(0)
    assert prompts.decoder(None)([3, 4]) == "3 4"


@pytest.fixture(scope="module")
def pair():
    hf, ours, _ = tiny("llama")
    return hf, ours


@pytest.fixture(scope="module")
def model(pair):
    return pair[1]


def test_caa_last_is_the_mean_last_token_difference(pair):
    import torch

    hf, model = pair
    make = prompts.random_prompt_maker(model.config.vocab_size)
    code, prose = [make(p) for p in prompts.CODE[:3]], [make(p) for p in prompts.PROSE[:3]]
    layer = 1

    def last_resid(p):  # transformers, one unpadded prompt at a time: hidden_states[l] = resid_pre[l]
        with torch.no_grad():
            hs = hf(torch.tensor([p]), output_hidden_states=True).hidden_states
        return hs[layer][0, -1].double().numpy()

    want = np.mean([last_resid(p) for p in code], 0) - np.mean([last_resid(p) for p in prose], 0)
    got = base_vector.caa_last(model, code, prose, layer)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_code_theta0_fixed_rho_is_the_scaled_reply_design(model):
    make = prompts.random_prompt_maker(model.config.vocab_size)
    code, prose = [make(p) for p in prompts.CODE[:2]], [make(p) for p in prompts.PROSE[:2]]
    neutral = [make(p) for p in prompts.NEUTRAL[:1]]
    reply = vectors.reply_mean_difference(model, code, prose, 1, 2)
    last = base_vector.caa_last(model, code, prose, 1)
    theta0, info = base_vector.code_theta0(model, code, prose, neutral, 1, 3.0, [0.5], 2, 2, str, fixed_rho=0.5)
    np.testing.assert_allclose(theta0, reply / np.linalg.norm(reply) * 0.5 * 3.0, rtol=1e-6)
    assert np.linalg.norm(theta0) == pytest.approx(1.5, rel=1e-5)
    assert info["design"] == "reply" and info["calibrated"] is False and info["table"] == []
    cos = float(reply @ last / np.linalg.norm(reply) / np.linalg.norm(last))
    assert info["cos_reply_last"] == pytest.approx(cos, abs=1e-6)
    # calibrated over one rho and the reply design alone (scripts/modularity.py): same vector
    theta_c, info_c = base_vector.code_theta0(model, code, prose, neutral, 1, 3.0, [0.5], 2, 2,
                                              lambda ids: " ".join(map(str, ids)), designs=("reply",))
    np.testing.assert_allclose(theta_c, theta0, rtol=1e-6)
    assert info_c["calibrated"] and [r["rho"] for r in info_c["table"]] == [0.5] and "cos_reply_last" not in info_c


def test_code_theta0_refuses_bad_inputs(model):
    with pytest.raises(ValueError, match="designs"):
        base_vector.caa_designs(model, [[1, 2]], [[3, 4]], 1, 2, designs=("mean",))
    with pytest.raises(ValueError, match="x_norm"):
        base_vector.code_theta0(model, [[1, 2]], [[3, 4]], [[5]], 1, 0.0, [0.5], 2, 2, str)
