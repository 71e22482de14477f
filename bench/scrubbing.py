"""Causal scrubbing speed: `lens.scrubbing.scrub` vs a plain PyTorch forward-hook loop.

    .venv/bin/python bench/scrubbing.py                      # 1000 examples, the naive induction hypothesis
    .venv/bin/python bench/scrubbing.py --examples 200 --json runs/bench_scrub.json

Both sides scrub the SAME hypothesis with the SAME resampled inputs (one draw of
`lens.scrubbing.sample_runs`) on our 2-layer attention-only induction model
(`lens.scrubbing_examples.synthetic_induction_model`, trained into --cache if absent).  transformers
has no attention-only GPT-2, so the reference is a plain PyTorch implementation of the
same forward (LayerNorm, learned positions, tied unembedding) with TransformerLens-style
hook points (per-head q / k / v inputs, z, the final residual): one cached forward per
distinct resampled input, one hooked forward per head whose inputs are patched, one for
the output, each batched over all examples.  Ours: one compiled, vmapped program, chunked
by a memory budget.  The per-example losses of both sides are compared.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import models.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lens import scrubbing as S  # noqa: E402
from lens import scrubbing_examples as X  # noqa: E402
from lens.cli import int_at_least  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int_at_least(2), default=1000)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--hypothesis", choices=("naive", "refined"), default="naive")
    ap.add_argument("--cache", type=Path, default=Path("runs"))
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


# ------------------------------------------------------------------ the PyTorch reference
def torch_model(model):
    """Our attention-only GPT-2-style model as a plain torch.nn.Module with hook points."""
    import torch
    from torch import nn

    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    c = model.config

    class Hook(nn.Module):
        def forward(self, x):
            return x

    class AttnOnly(nn.Module):
        def __init__(self):
            super().__init__()
            b = model.blocks
            self.p = {k: t(getattr(b, k)) for k in ("ln1_w", "ln1_b", "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V",
                                                     "W_O", "b_O")}
            self.embed, self.pos = t(model.embed), t(model.pos_embed)
            self.lnf_w, self.lnf_b = t(model.final_norm_w), t(model.final_norm_b)
            hooks = lambda: nn.ModuleList([Hook() for _ in range(c.n_layers)])  # noqa: E731
            self.hook_resid_pre, self.hook_q_input, self.hook_k_input, self.hook_v_input, self.hook_z = (
                hooks(), hooks(), hooks(), hooks(), hooks())
            self.hook_resid_final = Hook()

        @staticmethod
        def ln(x, w, b):
            x = x - x.mean(-1, keepdim=True)
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w + b

        def forward(self, tokens):
            B, T = tokens.shape
            p = self.p
            x = self.embed[tokens] + self.pos[:T]
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
            for l in range(c.n_layers):
                x = self.hook_resid_pre[l](x)
                xi = x[:, :, None, :].expand(B, T, c.n_heads, c.d_model)
                qi, ki, vi = (self.ln(h[l](xi), p["ln1_w"][l], p["ln1_b"][l])
                              for h in (self.hook_q_input, self.hook_k_input, self.hook_v_input))
                q = torch.einsum("bshd,hdk->bshk", qi, p["W_Q"][l]) + p["b_Q"][l]
                k = torch.einsum("bshd,hdk->bshk", ki, p["W_K"][l]) + p["b_K"][l]
                v = torch.einsum("bshd,hdk->bshk", vi, p["W_V"][l]) + p["b_V"][l]
                s = torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(c.d_head)
                a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
                z = self.hook_z[l](torch.einsum("bhqs,bshk->bqhk", a, v))
                x = x + torch.einsum("bshk,hkd->bsd", z, p["W_O"][l]) + p["b_O"][l]
            x = self.hook_resid_final(x)
            return self.ln(x, self.lnf_w, self.lnf_b) @ self.embed.T

    return AttnOnly().eval()


def torch_scrub(tm, plan, run_tokens, targets) -> np.ndarray:
    """Per-example losses of the treeified run, with forward hooks (the usual way)."""
    import torch

    c_layers = len(tm.hook_z)
    toks = torch.tensor(run_tokens.transpose(1, 0, 2).astype(np.int64))  # [R, N, seq]
    cache = []
    for r in range(toks.shape[0]):  # one cached forward per distinct input
        got, handles = {}, []
        for l in range(c_layers):
            handles.append(tm.hook_resid_pre[l].register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("pre", l), o)))
            handles.append(tm.hook_z[l].register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("z", l), o)))
        handles.append(tm.hook_resid_final.register_forward_hook(lambda m, i, o: got.__setitem__("final", o)))
        tm(toks[r])
        for h in handles:
            h.remove()
        cache.append(got)

    W_O = tm.p["W_O"]

    def head_out(z, l, h):
        return z[:, :, h] @ W_O[l, h]

    def plain_writer(t, r):
        if isinstance(t, S.Embed):
            return cache[r][("pre", 0)]
        if isinstance(t, S.Head):
            return head_out(cache[r][("z", t.layer)], t.layer, t.head)
        return cache[r][("pre", t.layer)] if t.layer < c_layers else cache[r]["final"]

    def plain_reader(t, r):
        if isinstance(t, S.Output) or (isinstance(t, S.Resid) and t.layer == c_layers):
            return cache[r]["final"]
        return cache[r][("pre", t.layer)]

    def mask(positions, seq):
        m = torch.zeros(seq, 1)
        m[slice(None) if positions is None else list(positions)] = 1.0
        return m

    def reader_value(p):
        x = plain_reader(p.target, p.run)
        for ch in p.children:
            x = x + mask(ch.positions, x.shape[1]) * (writer_value(ch) - plain_writer(ch.target, p.run))
        return x

    def writer_value(p):
        t = p.target
        if isinstance(t, S.Resid) and p.children:
            return reader_value(p)
        if not p.children or isinstance(t, S.Embed):
            return plain_writer(t, p.run)
        got, handles = {}, []
        hooks = {"q": tm.hook_q_input, "k": tm.hook_k_input, "v": tm.hook_v_input}
        for ch in p.children:
            value = reader_value(ch)

            def patch(m, i, o, value=value, h=t.head):
                o = o.clone()
                o[:, :, h] = value
                return o

            handles.append(hooks[ch.target.which][t.layer].register_forward_hook(patch))
        handles.append(tm.hook_z[t.layer].register_forward_hook(lambda m, i, o: got.__setitem__("z", o)))
        tm(toks[p.run])
        for h in handles:
            h.remove()
        return head_out(got["z"], t.layer, t.head)

    final = reader_value(plan)
    handle = tm.hook_resid_final.register_forward_hook(lambda m, i, o: final)
    logits = tm(toks[plan.run])
    handle.remove()
    logp = torch.log_softmax(logits, -1)
    nxt, m = torch.tensor(targets["next"].astype(np.int64)), torch.tensor(targets["mask"])
    nll = -torch.gather(logp, -1, nxt[..., None])[..., 0]
    return ((nll * m).sum(-1) / m.sum(-1).clamp(min=1.0)).numpy()


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    model = X.synthetic_induction_model(args.cache / "induction_synth")
    from lens.induction import measure_induction

    ind = measure_induction(model, jax.random.key(1), first_token=0, n=32, block_len=15, low=1)
    heads1 = [(1, int(np.argmax(ind.induction_score[1])))]
    prev = [(0, int(np.argmax(ind.previous_token_score[0])))]
    hyp = X.induction_hypotheses(heads1, prev, model.config.n_heads)[args.hypothesis]
    tokens, targets = X.synthetic_data(args.examples, X.SyntheticInduction())
    plan, runs, _ = S.sample_runs(hyp, len(tokens), np.random.default_rng(0), {})
    run_tokens = tokens[runs]  # [N, R, seq]

    def ours():
        return S.scrub(model, tokens, hyp, X.masked_nll, targets, seeds=(0,)).losses[0]

    t0 = time.perf_counter()
    ours_losses = ours()
    first = time.perf_counter() - t0
    tm = torch_model(model)

    def reference():
        with torch.no_grad():
            return torch_scrub(tm, plan, run_tokens, targets)

    ref_losses = reference()
    t_ours, t_ref = [], []
    for _ in range(args.repeats):  # alternated, so machine load hits both alike
        t = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        reference()
        t_ref.append(time.perf_counter() - t)
    result = {
        "examples": len(tokens), "seq": int(tokens.shape[1]), "hypothesis": args.hypothesis,
        "nodes": sum(1 for _ in hyp.walk()), "distinct_runs": int(runs.shape[1]),
        "induction_head": heads1, "previous_token_head": prev,
        "ours_s": float(np.median(t_ours)), "torch_hooks_s": float(np.median(t_ref)),
        "ours_first_call_s_incl_compile": first,
        "ratio": float(np.median(t_ref) / np.median(t_ours)),
        "max_abs_loss_diff": float(np.abs(ours_losses - ref_losses).max()),
        "threads": {"torch": torch.get_num_threads()}, "repeats": args.repeats,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
