"""The orthonormal basis MELBO / MELBO-ortho keeps vectors orthogonal to.

Earlier vectors (and fixed rows such as MELBO-ortho's theta0) are kept in an orthonormal
basis buffer of FIXED shape [n_fixed + K, d] (unused rows are zero, so a projection
`v - B^T (B v)` ignores them and one compilation serves every block).  The basis is built
in float64 (Gram-Schmidt twice per row, `extend_basis`) and projections are applied twice
("twice is enough", `project_off`), which keeps raw |cos| at float32 rounding (~1e-7); a
batched block is orthogonalised jointly in index order (`gram_schmidt`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lens.steering.melbo.problem import HIGHEST


def project_off(v: Float[Array, " d"], basis: Float[Array, "n d"]) -> Float[Array, " d"]:
    """`v - B^T (B v)` applied twice, B = orthonormal rows (zero rows are ignored)."""
    for _ in range(2):
        v = v - jnp.einsum("n,nd->d", jnp.einsum("nd,d->n", basis, v, precision=HIGHEST), basis, precision=HIGHEST)
    return v


def gram_schmidt(vs: Float[Array, "B d"]) -> Float[Array, "B d"]:
    """Jointly orthogonalise a block in index order, keeping each residual's length:
    row b becomes its component orthogonal to rows < b (the QR factorisation's `Q R_bb`,
    sign-fixed so that row 0 is unchanged in direction).  A block of one is returned as is."""
    if vs.shape[0] == 1:
        return vs
    q, r = jnp.linalg.qr(vs.T)  # vs.T = q r, q [d, B]
    diag = jnp.diagonal(r)
    return (q * diag[None, :]).T


def extend_basis(basis: np.ndarray, n: int, rows: np.ndarray) -> int:
    """Append `rows` to the orthonormal float64 `basis[:n]` in place (Gram-Schmidt twice
    per row, in order); returns the new count.  A row already in the span is skipped."""
    for v in np.asarray(rows, np.float64):
        norm0 = np.linalg.norm(v)
        for _ in range(2):
            v = v - basis[:n].T @ (basis[:n] @ v)
        if np.linalg.norm(v) > 1e-6 * max(norm0, 1e-30):
            basis[n] = v / np.linalg.norm(v)
            n += 1
    return n
