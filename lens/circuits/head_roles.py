"""Head roles in an IOI-style task by the usual signatures (Wang et al. 2022): where a head
attends from the last token (END) -- the indirect object (IO) or the subject (S) --, its
direct logit attribution to logit(IO) - logit(S), and its induction / duplicate-token /
previous-token scores on repeated random tokens; a role name from those numbers.

    rows = head_roles(model, [(clean, correct, wrong), ...], heads=[(9, 6), (10, 0)])
    rows[0]["role"]   # "name mover", "negative name mover", "S-attending (S-inhibition?)", ...

The name is a guide to where to look, not a proof of what a head does: the numbers beside
it are the evidence (scripts/patching.py reports them for the top heads by patching effect).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from lens.circuits.induction import _patterns_and_losses, repeated_tokens, scores_from_patterns
from lens.core.capture import head_outputs, run_with_cache
from lens.models import Capture
from lens.models.core.transformer import Transformer
from lens.readout.dla import logit_direction

# a role's thresholds: attention share from END, and the induction / duplicate-token scores
ATTENTION, SCORE = 0.3, 0.3


def role_name(row: dict) -> str:
    """A name by the usual signatures (Wang et al.), a guide, not a proof: END attends to IO
    (> ATTENTION, and over twice its attention to S) -> a name mover, negative when its
    direct logit attribution to IO - S is not positive; END attends to S the same way ->
    S-attending; else an induction or duplicate-token score > SCORE; else "unclear"."""
    io, s = row["attn_end_to_io"], row["attn_end_to_s"]
    if io > ATTENTION and io > 2 * s:
        return "name mover" if row["dla_io_minus_s"] > 0 else "negative name mover"
    if s > ATTENTION and s > 2 * io:
        return "S-attending (S-inhibition?)"
    if row["induction_score"] > SCORE:
        return "induction"
    if row["duplicate_token_score"] > SCORE:
        return "duplicate token"
    return "unclear"


def head_roles(model: Transformer, groups: list[tuple[Int[np.ndarray, "P seq"], Int[np.ndarray, " P"], Int[np.ndarray, " P"]]],
               heads: list[tuple[int, int]]) -> list[dict]:
    """Per head, over the clean prompts: attention from the last token (END) to the IO
    token and to the S tokens (S1 + S2), the head's direct logit attribution to
    logit(IO) - logit(S) at END (its output through the final norm's actual divisor),
    and its induction / duplicate-token / previous-token scores on repeated random tokens."""
    c = model.config
    bad = [hd for hd in heads if not (0 <= hd[0] < c.n_layers and 0 <= hd[1] < c.n_heads)]
    if bad or not heads:
        raise ValueError(f"heads must be a non-empty list of (layer, head) inside the model's {c.n_layers} x "
                         f"{c.n_heads}; got {bad or heads}")
    if not groups:
        raise ValueError("groups must hold at least one (clean, correct, wrong) group")
    to_io, to_s, dla = [], [], []
    gamma = np.asarray(model.final_norm_w, np.float32)
    for clean, correct, wrong in groups:
        _, cache = run_with_cache(model, jnp.asarray(clean), Capture(attn_pattern=True, head_z=True, norms=True))
        pat = np.asarray(cache.attn_pattern, np.float32)[:, :, :, -1, :]  # [P, L, H, seq] from END
        out = np.asarray(head_outputs(model, cache), np.float32)[:, :, -1]  # [P, L, H, d]
        scale = np.asarray(cache.final_scale, np.float32)[:, -1]  # [P]
        for i in range(len(clean)):
            io_pos = clean[i] == correct[i]
            s_pos = clean[i] == wrong[i]
            to_io.append(pat[i][..., io_pos].sum(-1))
            to_s.append(pat[i][..., s_pos].sum(-1))
            u, _ = logit_direction(model, int(correct[i]), int(wrong[i]))
            x = out[i] - out[i].mean(-1, keepdims=True) if c.norm_kind == "layer" else out[i]
            dla.append(x @ (np.asarray(u) * gamma) / scale[i])
    to_io, to_s, dla = np.stack(to_io), np.stack(to_s), np.stack(dla)
    T = 20
    probe = repeated_tokens(jax.random.key(3), 16, T, c.vocab_size, 0, low=min(1000, c.vocab_size // 2))
    patterns, _ = _patterns_and_losses(model, jnp.asarray(probe))
    patterns = np.asarray(patterns)
    induction, previous = scores_from_patterns(patterns, T)
    second = np.arange(T + 1, 2 * T + 1)
    duplicate = patterns[..., second, second - T].mean(axis=(0, -1))
    rows = []
    for l, h in heads:
        rows.append({"head": [l, h], "attn_end_to_io": float(to_io[:, l, h].mean()),
                     "attn_end_to_s": float(to_s[:, l, h].mean()),
                     "dla_io_minus_s": float(dla[:, l, h].mean()), "dla_sign": "+" if dla[:, l, h].mean() > 0 else "-",
                     "induction_score": float(induction[l, h]), "duplicate_token_score": float(duplicate[l, h]),
                     "previous_token_score": float(previous[l, h])})
    for r in rows:
        r["role"] = role_name(r)
    return rows
