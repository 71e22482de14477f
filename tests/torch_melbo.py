"""The original MELBO-ortho loop in PyTorch (transformers + a forward hook adding theta
after block `source`, torch.optim.Adam, the iterate projected off theta0 and the earlier
vectors after every step, the whole CausalLM run every step as the original does): the
reference of tests/lens/steering/test_melbo_parity.py.  (bench/melbo.py times its own copy
of this loop, with a truncated-forward variant; bench and tests never import each other.)"""

from __future__ import annotations

import numpy as np


def torch_melbo_ortho(hf, tokens: list[int], theta0: np.ndarray, steps: int, source: int, target: int,
                      lr: float, init: np.ndarray) -> np.ndarray:
    """len(init) vectors, one at a time, each starting from its raw normal draw in `init`
    [n_vectors, d] (projected off theta0 and the earlier vectors, scaled to |theta0|); the
    objective |mean_t h_target(theta) - mean_t h_target(theta0)|.  Returns [n_vectors, d]."""
    import torch

    layers = hf.model.layers
    ids = torch.as_tensor([tokens])

    def forward():  # the original's self.model(...): CausalLM, lm_head included
        return hf(input_ids=ids, output_hidden_states=True).hidden_states[target + 1][0]

    theta0 = torch.as_tensor(np.array(theta0, np.float32))  # a writable copy
    state = {"v": None}

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + state["v"],) + tuple(output[1:])
        return output + state["v"]

    handle = layers[source].register_forward_hook(hook)
    for p in hf.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            state["v"] = theta0
            ref = forward().mean(0)
        found = [theta0 / theta0.norm()]
        vectors = []
        for draw in init:
            v = torch.as_tensor(np.array(draw, np.float32))
            for q in found:
                v = v - (v @ q) * q
            v = (v / v.norm() * theta0.norm()).requires_grad_(True)
            opt = torch.optim.Adam([v], lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                state["v"] = v
                loss = (forward().mean(0) - ref).norm()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for q in found:
                        v -= (v @ q) * q
            with torch.no_grad():
                vectors.append(v.detach().clone().numpy())
                u = v.detach().clone()
                for q in found:
                    u = u - (u @ q) * q
                found.append(u / u.norm())
        return np.stack(vectors)
    finally:
        handle.remove()
