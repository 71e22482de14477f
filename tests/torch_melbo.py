"""The original MELBO-ortho loop in PyTorch (transformers + a forward hook adding theta
after block `source`, torch.optim.Adam, the iterate projected off theta0 and the earlier
vectors after every step, the whole CausalLM run every step as the original does): the
reference of tests/lens/steering/test_melbo_parity.py.  (bench/melbo.py times its own copy
of this loop, with a truncated-forward variant; bench and tests never import each other.)"""

from __future__ import annotations

import numpy as np


def torch_melbo_ortho(hf, tokens: list[int], theta0: np.ndarray, steps: int, source: int, target: int,
                      lr: float, init: np.ndarray, earlier: np.ndarray | None = None) -> np.ndarray:
    """len(init) vectors, one at a time, each starting from its raw normal draw in `init`
    [n_vectors, d] (projected off theta0 and the earlier vectors, scaled to |theta0|); the
    objective |mean_t h_target(theta) - mean_t h_target(theta0)|.  `earlier` [m, d]: vectors
    found before (by another run) that every new vector must also be orthogonal to.
    Returns [n_vectors, d]."""
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
        for e in ([] if earlier is None else earlier):
            u = torch.as_tensor(np.array(e, np.float32))
            for _ in range(2):
                for q in found:
                    u = u - (u @ q) * q
            found.append(u / u.norm())
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


def torch_melbo_ortho_blocks(hf, tokens: list[int], theta0: np.ndarray, steps: int, source: int, target: int,
                             lr: float, init: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched MELBO-ortho as a plain loop: the vectors in blocks of `block` (the last block
    may be smaller), each block trained JOINTLY, written from the algorithm's description
    (not from lens.steering.melbo.train):

      * every vector of a block starts from its raw draw in `init`, projected off theta0 and
        every vector of the earlier blocks, scaled to |theta0|; then the block is made
        orthogonal within itself by Gram-Schmidt in index order (vector b minus its
        components along the already-orthogonalised vectors 0..b-1, its length kept);
      * one torch.optim.Adam over the [B, d] block (Adam is elementwise, so each row sees
        exactly its own Adam), loss = the sum of the B per-vector MELBO-ortho losses
        |mean_t h_target(v_b) - mean_t h_target(theta0)| (each row's gradient is its own
        loss's), the whole CausalLM run once per vector per step;
      * after every step: every row projected off theta0 and the earlier blocks, then the
        within-block Gram-Schmidt again (so vector 0 of a block only ever sees the earlier
        blocks: it is trained exactly as a sequential vector against that basis).

    Returns (vectors [n, d], losses [n, steps]: each vector's loss before each step)."""
    import torch

    layers = hf.model.layers
    ids = torch.as_tensor([tokens])
    state = {"v": None}

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + state["v"],) + tuple(output[1:])
        return output + state["v"]

    def mean_target(v):
        state["v"] = v
        return hf(input_ids=ids, output_hidden_states=True).hidden_states[target + 1][0].mean(0)

    def off_basis(v, basis):  # v minus its components along the orthonormal rows found so far
        for q in basis:
            v = v - (v @ q) * q
        return v

    def within_block(rows):  # Gram-Schmidt in index order, lengths of the residuals kept
        out = []
        for v in rows:
            for u in out:
                v = v - (v @ u) / (u @ u) * u
            out.append(v)
        return torch.stack(out)

    theta0 = torch.as_tensor(np.array(theta0, np.float32))
    handle = layers[source].register_forward_hook(hook)
    for p in hf.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            ref = mean_target(theta0)
        basis = [theta0 / theta0.norm()]
        vectors, losses = [], []
        for start in range(0, len(init), block):
            draws = [torch.as_tensor(np.array(d, np.float32)) for d in init[start : start + block]]
            with torch.no_grad():
                rows = [off_basis(d, basis) for d in draws]
                rows = within_block([r / r.norm() * theta0.norm() for r in rows])
            v = rows.clone().requires_grad_(True)
            opt = torch.optim.Adam([v], lr=lr)
            block_losses = []
            for _ in range(steps):
                opt.zero_grad()
                per = torch.stack([(mean_target(v[b]) - ref).norm() for b in range(v.shape[0])])
                per.sum().backward()
                block_losses.append(per.detach().numpy().copy())
                opt.step()
                with torch.no_grad():
                    v.copy_(within_block([off_basis(r, basis) for r in v]))
            done = v.detach().clone()
            vectors.extend(done.numpy())
            losses.extend(np.stack(block_losses, axis=1))
            for r in done:
                u = off_basis(off_basis(r, basis), basis)
                basis.append(u / u.norm())
        return np.stack(vectors), np.stack(losses)
    finally:
        handle.remove()
