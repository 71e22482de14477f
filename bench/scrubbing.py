"""Causal scrubbing speed: `lens.circuits.scrubbing.scrub` vs a plain PyTorch forward-hook loop.

    .venv/bin/python bench/scrubbing.py                      # 1000 examples, the naive induction hypothesis
    .venv/bin/python bench/scrubbing.py --examples 200 --json runs/bench_scrub.json
    taskset -c 1 .venv/bin/python bench/scrubbing.py --torch-threads 1   # one core each: robust to load

Both sides scrub the SAME hypothesis with the SAME resampled inputs (one draw of
`lens.circuits.scrubbing.sample_runs`) on our 2-layer attention-only induction model
(`lens.circuits.scrubbing_examples.synthetic_induction_model`, trained into --cache if absent).  transformers
has no attention-only GPT-2, so the reference is a plain PyTorch implementation of the
same forward (LayerNorm, learned positions, tied unembedding) with TransformerLens-style
hook points (per-head q / k / v inputs, split only in a layer where one is hooked, z, the
final residual): one cached forward per resampled input column, one hooked forward per
head whose inputs are patched, one for the output, each batched over all examples.  A
second reference variant (`torch_hooks_shared`) caches ONE forward of the dataset and
gathers every column from it, as ours does.  Ours: one plain forward per dataset example,
then one compiled, vmapped program (gathers, one-head blocks, unembedding), chunked, with
`--workers` chunks in flight on Python threads (default: one per core, as `scrub` does;
torch's intra-op threads default to one per core too); `ours_1_worker` is the same scrub
with one chunk at a time.  The per-example losses of all three are compared; wall and
process-CPU seconds reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lens.circuits import scrubbing as S  # noqa: E402
from lens.circuits import scrubbing_runs as R  # noqa: E402
from lens.circuits import scrubbing_sampling as Sm  # noqa: E402
from lens.circuits import scrubbing_examples as X  # noqa: E402
from bench_common import write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int_at_least(2), default=1000)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--hypothesis", choices=("naive", "refined"), default="naive")
    ap.add_argument("--cache", type=Path, default=Path("runs"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--torch-threads", type=int_at_least(1), default=None,
                    help="torch intra-op threads (default: torch's own choice)")
    ap.add_argument("--workers", type=int_at_least(1), default=None,
                    help="our chunks in flight at once (default: lens.circuits.scrubbing.default_workers(), one per core)")
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
                hooks = (self.hook_q_input[l], self.hook_k_input[l], self.hook_v_input[l])
                if any(h._forward_hooks for h in hooks):
                    # per-head q / k / v inputs (TransformerLens' use_split_qkv_input), only
                    # in a layer where some input is hooked: elsewhere one norm, one matmul
                    xi = x[:, :, None, :].expand(B, T, c.n_heads, c.d_model)
                    qi, ki, vi = (self.ln(h(xi), p["ln1_w"][l], p["ln1_b"][l]) for h in hooks)
                    q = torch.einsum("bshd,hdk->bshk", qi, p["W_Q"][l]) + p["b_Q"][l]
                    k = torch.einsum("bshd,hdk->bshk", ki, p["W_K"][l]) + p["b_K"][l]
                    v = torch.einsum("bshd,hdk->bshk", vi, p["W_V"][l]) + p["b_V"][l]
                else:
                    h = self.ln(x, p["ln1_w"][l], p["ln1_b"][l])
                    q, k, v = (torch.einsum("bsd,hdk->bshk", h, p[w][l]) + p[b][l]
                               for w, b in (("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")))
                s = torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(c.d_head)
                a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
                z = self.hook_z[l](torch.einsum("bhqs,bshk->bqhk", a, v))
                x = x + torch.einsum("bshk,hkd->bsd", z, p["W_O"][l]) + p["b_O"][l]
            x = self.hook_resid_final(x)
            return self.ln(x, self.lnf_w, self.lnf_b) @ self.embed.T

    return AttnOnly().eval()


def torch_scrub(tm, plan, tokens, runs, targets, shared: bool = False) -> np.ndarray:
    """Per-example losses of the treeified run, with forward hooks (the usual way): one
    cached forward per resampled input column (shared=True: one cached forward of the
    dataset, each column's activations gathered from it, as ours does), one hooked forward
    per patched head, one for the output."""
    import torch

    c_layers = len(tm.hook_z)
    toks = torch.tensor(tokens[runs].transpose(1, 0, 2).astype(np.int64))  # [R, N, seq]

    def cached(batch):
        got, handles = {}, []
        for l in range(c_layers):
            handles.append(tm.hook_resid_pre[l].register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("pre", l), o)))
            handles.append(tm.hook_z[l].register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("z", l), o)))
        handles.append(tm.hook_resid_final.register_forward_hook(lambda m, i, o: got.__setitem__("final", o)))
        tm(batch)
        for h in handles:
            h.remove()
        return got

    if shared:
        every = cached(torch.tensor(tokens.astype(np.int64)))
        cache = [{k: v[torch.tensor(runs[:, r])] for k, v in every.items()} for r in range(runs.shape[1])]
    else:
        cache = [cached(toks[r]) for r in range(toks.shape[0])]

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


def forward_counts(plan, n: int, n_runs: int) -> dict:
    """Forwards (of one sequence) each side runs: ours, one plain forward per dataset
    example plus one ONE-HEAD block per patched head per example; the reference, one
    whole-model forward per resampled input column, per patched head and for the output,
    each over all examples."""
    patched = sum(1 for p in Sm.plan_nodes(plan) if isinstance(p.target, S.Head) and p.children)
    return {"ours": {"plain_forwards": n, "one_head_blocks": patched * n},
            "torch_hooks": {"whole_forwards": (n_runs + patched + 1) * n},
            "torch_hooks_shared": {"whole_forwards": (1 + patched + 1) * n}}


def profile_ours(model, tokens, hyp, targets, repeats: int, workers: int) -> dict:
    """Where our time goes (each part timed alone, best of `repeats`): host-side sampling
    (the recursive draws), the plain runs of the dataset, the rest of `scrub` given them
    (checks, sampling, the compiled treeified chunks: gathers, patched heads,
    unembedding, loss)."""
    def best(f):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f())
            ts.append(time.perf_counter() - t)
        return min(ts)

    plain = R.plain_runs(model, tokens, workers=workers)
    return {
        "sampling_s": best(lambda: Sm.sample_runs(hyp, len(tokens), np.random.default_rng(0), {})[1]),
        "plain_runs_s": best(lambda: R.plain_runs(model, tokens, workers=workers).final),
        "scrub_given_plain_runs_s": best(lambda: S.scrub(model, tokens, hyp, X.masked_nll, targets, plain=plain,
                                                         workers=workers).losses),
    }


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = X.synthetic_induction_model(args.cache / f"induction_synth_{X.SyntheticInduction().tag()}")
    from lens.circuits.induction import measure_induction

    ind = measure_induction(model, jax.random.key(1), first_token=0, n=32, block_len=15, low=1)
    heads1 = [(1, int(np.argmax(ind.induction_score[1])))]
    prev = [(0, int(np.argmax(ind.previous_token_score[0])))]
    hyp = X.induction_hypotheses(heads1, prev, model.config.n_heads)[args.hypothesis]
    tokens, targets = X.synthetic_data(args.examples, X.SyntheticInduction())
    plan, runs, _ = Sm.sample_runs(hyp, len(tokens), np.random.default_rng(0), {})

    workers = R.default_workers() if args.workers is None else args.workers

    def ours(w=workers):
        return S.scrub(model, tokens, hyp, X.masked_nll, targets, seeds=(0,), workers=w).losses[0]

    t0 = time.perf_counter()
    ours_losses = ours()
    first = time.perf_counter() - t0
    tm = torch_model(model)

    def reference(shared=False):
        with torch.no_grad():
            return torch_scrub(tm, plan, tokens, runs, targets, shared)

    ref_losses, shared_losses = reference(), reference(True)
    one_losses = ours(1)  # (compiles the one-worker chunk shape)
    t_ours, t_ref, t_shared, t_one = [], [], [], []
    cpu = {"ours": [], "torch_hooks": [], "torch_hooks_shared": [], "ours_1_worker": []}  # process CPU seconds:
    for _ in range(args.repeats):  # alternated, so machine load hits all alike     (less load-sensitive than wall)
        for f, ts, key in ((ours, t_ours, "ours"), (reference, t_ref, "torch_hooks"),
                           (lambda: reference(True), t_shared, "torch_hooks_shared"),
                           (lambda: ours(1), t_one, "ours_1_worker")):
            t, c = time.perf_counter(), time.process_time()
            f()
            ts.append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    steady = float(np.median(t_ours))
    result = {
        "examples": len(tokens), "seq": int(tokens.shape[1]), "hypothesis": args.hypothesis,
        "nodes": sum(1 for _ in hyp.walk()), "distinct_runs": int(runs.shape[1]),
        "induction_head": heads1, "previous_token_head": prev,
        "ours_s": steady, "torch_hooks_s": float(np.median(t_ref)),
        "torch_hooks_shared_s": float(np.median(t_shared)), "ours_1_worker_s": float(np.median(t_one)),
        "workers": workers,
        "ours_first_call_s_incl_compile": first, "compile_s_approx": first - steady,
        "ratio": float(np.median(t_ref) / steady),
        "ratio_vs_shared_reference": float(np.median(t_shared) / steady),
        "max_abs_loss_diff": float(np.abs(ours_losses - ref_losses).max()),
        "max_abs_loss_diff_shared": float(np.abs(ours_losses - shared_losses).max()),
        "max_abs_loss_diff_1_worker": float(np.abs(ours_losses - one_losses).max()),
        "cpu_s": {k: float(np.median(v)) for k, v in cpu.items()},
        "cpu_ratio": float(np.median(cpu["torch_hooks"]) / np.median(cpu["ours"])),
        "forwards": forward_counts(plan, len(tokens), runs.shape[1]),
        "ours_profile": profile_ours(model, tokens, hyp, targets, args.repeats, workers),
        "threads": {"torch": torch.get_num_threads()}, "repeats": args.repeats,
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
