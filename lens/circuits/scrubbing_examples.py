"""Models and data for the causal-scrubbing worked examples (`scripts/causal_scrubbing.py`,
`bench/scrubbing.py`): a 2-layer attention-only model trained here until it has induction
heads, and a balanced-parentheses classifier trained on a synthetic task.

Both train through the one loop (`lens.training.train.train`: checkpoints, exact resume, progress
bar) and are cached under `runs/`; a second call loads the saved model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens import models
from lens.training import data, train
from lens.models.core.config import ModelConfig

TEXT = ("shakespeare", "python-docs", "python-code")


# ------------------------------------------------------------------ induction model
@dataclasses.dataclass(frozen=True)
class InductionSetup:
    """The attention-only model's size and training.  `repeat_frac` of the training rows
    are a natural-text segment followed by itself (r + r), `random_repeat_frac` random
    ids repeated the same way: on natural text alone 1500 steps formed no induction
    heads (scripts/train_toy.py attn-only-2l), nor did 1200 steps with 30% text repeats
    (d 256, 8 heads): the random repeats make copying the only way to predict."""

    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 64
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    repeat_frac: float = 0.3
    random_repeat_frac: float = 0.2
    seed: int = 0


def attn_only_config(s: InductionSetup, tokenizer) -> ModelConfig:
    """GPT-2-style 2-layer attention-only model (LayerNorm, learned positions, tied)."""
    return ModelConfig(
        architecture="gpt2", vocab_size=tokenizer.vocab_size, d_model=s.d_model, n_layers=2,
        n_heads=s.n_heads, n_kv_heads=s.n_heads, d_head=s.d_model // s.n_heads, d_mlp=0,
        max_seq_len=s.seq_len, norm_kind="layer", norm_eps=1e-5, activation="gelu_new",
        gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=False,
        norm_bias=True, tie_embeddings=True, attn_only=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tuple(tokenizer.eos_token_ids), pad_token_id=tokenizer.pad_token_id)


def text_tokenizer():
    from lens.training.bpe import corpus_tokenizer

    return corpus_tokenizer(TEXT, 4096)


def text_rows(tokenizer, seq_len: int, split: str, seed: int = 0) -> Int[np.ndarray, "N seq"]:
    """Rows of seq_len + 1 tokens from the three corpora, shuffled together."""
    return data.mixed_rows(TEXT, tokenizer, seq_len + 1, split, seed=seed)


def with_repeats(rows: np.ndarray, frac: float, seed: int, random_frac: float = 0.0,
                 vocab: int | None = None) -> np.ndarray:
    """A copy of `rows` in which a fraction `frac` (chosen by `seed`) becomes r + r + ...
    (the row's first half repeated to the row's length) and a fraction `random_frac` the
    same with r drawn uniformly from [256, vocab) (ids above the byte range)."""
    rows = rows.copy()
    n, width = rows.shape
    half = width // 2
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    chosen = u < frac + random_frac
    if random_frac:
        rand = u < random_frac
        rows[rand, :half] = rng.integers(256, vocab, (int(rand.sum()), half))
    rep = np.concatenate([rows[chosen, :half]] * (width // half + 1), axis=1)[:, :width]
    rows[chosen] = rep
    return rows


def induction_model(out_dir: str | Path, setup: InductionSetup = InductionSetup(),
                    progress: bool = False):
    """(model, tokenizer): loaded from out_dir/model when it exists, else trained (resuming
    from out_dir/checkpoint.safetensors when present) and saved there."""
    out_dir = Path(out_dir)
    tok = text_tokenizer()
    if (out_dir / "model").exists():
        return models.load(out_dir / "model")[0], tok
    cfg = attn_only_config(setup, tok)
    train_rows = with_repeats(text_rows(tok, setup.seq_len, "train", setup.seed), setup.repeat_frac,
                              setup.seed, setup.random_repeat_frac, tok.vocab_size)
    val_rows = text_rows(tok, setup.seq_len, "validation", setup.seed)
    tcfg = train.TrainConfig(steps=setup.steps, batch_size=setup.batch_size, lr=setup.lr,
                             warmup_steps=50, eval_every=100, eval_batches=8, checkpoint_every=100,
                             seed=setup.seed)
    model = models.init(cfg, jax.random.key(setup.seed))
    result = train.train(model, train_rows, val_rows, tcfg, out_dir,
                         train.TrainOptions(progress=progress, run_info={"setup": dataclasses.asdict(setup),
                                                                         "tokenizer": data.tokenizer_fingerprint(tok)}))
    models.save(result.model, out_dir / "model", tokenizer=tok)
    (out_dir / "setup.json").write_text(json.dumps(dataclasses.asdict(setup)) + "\n")
    return result.model, tok


def masked_nll(logits: Float[Array, "seq vocab"], target) -> Float[Array, ""]:
    """Mean next-token loss over the positions target["mask"] marks."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, target["next"][:, None], axis=-1)[:, 0]
    return (nll * target["mask"]).sum() / jnp.maximum(target["mask"].sum(), 1.0)


# ------------------------------------------------------------------ parentheses
# vocabulary: 0 BOS, 1 "(", 2 ")", 3 "unbalanced", 4 "balanced"
PAREN_VOCAB, OPEN, CLOSE, NO, YES = 5, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class ParenSetup:
    """A causal classifier reading [BOS] + `length` parens, answering at the last position."""
    length: int = 20
    d_model: int = 48
    n_layers: int = 2
    n_heads: int = 2
    d_mlp: int = 96
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def paren_features(parens: Int[np.ndarray, "N length"]) -> dict[str, np.ndarray]:
    """The reference's two tests: equal counts, and no prefix closing more than it opened."""
    step = np.where(parens == OPEN, 1, -1)
    height = np.cumsum(step, axis=1)
    count_ok = height[:, -1] == 0
    horizon_ok = height.min(axis=1) >= 0
    return {"count_ok": count_ok, "horizon_ok": horizon_ok, "balanced": count_ok & horizon_ok}


def paren_strings(n: int, length: int, seed: int) -> np.ndarray:
    """[n, length] parens: 1/2 balanced, 1/4 with unequal counts, 1/4 with equal counts
    that dip below zero (the hard unbalanced case)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, length), np.int32)
    kind = rng.permutation(np.arange(n) % 4)  # 0, 1 balanced; 2 count; 3 horizon
    for i in range(n):
        while True:
            if kind[i] == 2:
                s = rng.choice([OPEN, CLOSE], length)
            else:
                s = rng.permutation(np.array([OPEN] * (length // 2) + [CLOSE] * (length // 2)))
            f = paren_features(s[None])
            if (kind[i] < 2 and f["balanced"][0]) or (kind[i] == 2 and not f["count_ok"][0]) or \
               (kind[i] == 3 and not f["horizon_ok"][0]):
                out[i] = s
                break
            if kind[i] < 2:  # a random permutation is rarely balanced: build a Dyck word instead
                s, h = [], 0
                for j in range(length):
                    left = length - j
                    if h == 0 or (h < left and rng.random() < 0.5):
                        s.append(OPEN)
                        h += 1
                    else:
                        s.append(CLOSE)
                        h -= 1
                s = np.array(s)
                if paren_features(s[None])["balanced"][0]:
                    out[i] = s
                    break
    return out


def paren_rows(n: int, setup: ParenSetup, seed: int) -> np.ndarray:
    """[n, length + 2] rows: BOS, the parens, the answer token (the training target)."""
    s = paren_strings(n, setup.length, seed)
    answer = np.where(paren_features(s)["balanced"], YES, NO)
    return np.concatenate([np.zeros((n, 1), np.int32), s, answer[:, None]], axis=1).astype(np.int32)


def paren_loss(model, rows: Int[Array, "batch seq"]) -> Float[Array, ""]:
    """Cross-entropy of the answer at the last paren over the two answer tokens."""
    logits = jax.vmap(model)(rows[:, :-1])[:, -1, NO:YES + 1].astype(jnp.float32)
    label = (rows[:, -1] == YES).astype(jnp.int32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), label[:, None], 1).mean()


def paren_example_loss(logits: Float[Array, "seq vocab"], label) -> Float[Array, ""]:
    """One example's classification loss (label 1 = balanced), for `lens.circuits.scrubbing.scrub`."""
    lp = jax.nn.log_softmax(logits[-1, NO:YES + 1].astype(jnp.float32))
    return -lp[label]


def paren_example_margin(logits: Float[Array, "seq vocab"], label) -> Float[Array, ""]:
    """One example's negative logit margin -(logit(right answer) - logit(wrong answer)) at
    the last position: a metric that does not saturate where the cross-entropy is ~0."""
    lg = logits[-1, NO:YES + 1].astype(jnp.float32)
    return -(lg[label] - lg[1 - label])


def paren_model(out_dir: str | Path, setup: ParenSetup = ParenSetup(), progress: bool = False):
    """The classifier: loaded from out_dir/model, else trained (resuming) and saved."""
    out_dir = Path(out_dir)
    if (out_dir / "model").exists():
        return models.load(out_dir / "model")[0]
    cfg = ModelConfig(
        architecture="gpt2", vocab_size=PAREN_VOCAB, d_model=setup.d_model, n_layers=setup.n_layers,
        n_heads=setup.n_heads, n_kv_heads=setup.n_heads, d_head=setup.d_model // setup.n_heads,
        d_mlp=setup.d_mlp, max_seq_len=setup.length + 1, norm_kind="layer", norm_eps=1e-5,
        activation="gelu_new", gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True,
        mlp_bias=True, norm_bias=True, tie_embeddings=False, attn_only=False)
    train_rows = paren_rows(20000, setup, setup.seed + 1)
    val_rows = paren_rows(1024, setup, setup.seed + 2)
    tcfg = train.TrainConfig(steps=setup.steps, batch_size=setup.batch_size, lr=setup.lr, warmup_steps=50,
                             eval_every=250, eval_batches=8, checkpoint_every=250, seed=setup.seed,
                             weight_decay=0.01)
    model = models.init(cfg, jax.random.key(setup.seed))
    result = train.train(model, train_rows, val_rows, tcfg, out_dir,
                         train.TrainOptions(progress=progress, loss_fn=paren_loss,
                                            run_info={"setup": dataclasses.asdict(setup), "task": "parens"}))
    models.save(result.model, out_dir / "model", format="native")
    return result.model


@eqx.filter_jit
def batch_logits(model, tokens: Int[Array, "n seq"]) -> Float[Array, "n seq vocab"]:
    """The model's logits for each row (the model is an argument, not a closed-over constant:
    XLA would otherwise fold its weights into the program)."""
    return jax.vmap(model)(tokens)


def paren_accuracy(model, rows: np.ndarray) -> float:
    logits = batch_logits(model, jnp.asarray(rows[:, :-1]))[:, -1, NO:YES + 1]
    return float((np.asarray(logits).argmax(-1) == (rows[:, -1] == YES)).mean())


# ------------------------------------------------------------------ hypotheses
def induction_hypotheses(induction_heads: list[tuple[int, int]], previous_heads: list[tuple[int, int]],
                         n_heads0: int, layer0: int = 0) -> dict:
    """The induction study's hypotheses, in the reference's spirit.  Everything that does
    not pass through the induction heads keeps the real input (root `other` = Exact), so
    each hypothesis is judged on the induction heads' paths only:

      induction-random  the induction heads run on a random input (the study's L_random);
      naive             Olsson et al.: the query and the value read the token embedding, the
                        key reads the previous-token head(s) (on the real input); every
                        other path into the induction heads gets a random input;
      naive+embed-key   naive, with the key also reading the embeddings directly;
      refined           every input reads the embeddings and EVERY layer-0 head, but each
                        layer-0 head's attention pattern (its query and key) comes from a
                        random input: only its values are the real ones;
    and two controls that say how much the layer-0 heads matter to the induction heads:
      embed-only        the query, key and value read the embeddings only (every layer-0
                        head's contribution from a random input);
      k-all-layer0      naive, with the key reading the embeddings and EVERY layer-0 head
                        on the real input (patterns and values).
    """
    from lens.circuits.scrubbing import Embed, Exact, Head, HeadInput, Node, Output, Uncond

    def head(l, h, inputs: dict) -> Node:
        return Node(Head(l, h), Exact(), tuple(Node(HeadInput(l, h, w), Exact(), kids)
                                                for w, kids in inputs.items()), other=Uncond())

    def root(children) -> Node:
        return Node(Output(), Exact(), tuple(children), other=Exact())

    embed = (Node(Embed(), Exact()),)
    prev = tuple(Node(Head(*p), Exact()) for p in previous_heads)
    layer0_real = tuple(Node(Head(layer0, j), Exact()) for j in range(n_heads0))
    layer0 = tuple(Node(Head(layer0, j), Exact(), (Node(HeadInput(layer0, j, "v"), Exact()),), other=Uncond())
                   for j in range(n_heads0))
    return {
        "induction-random": root(Node(Head(*h), Uncond()) for h in induction_heads),
        "naive": root(head(*h, {"q": embed, "k": prev, "v": embed}) for h in induction_heads),
        "naive+embed-key": root(head(*h, {"q": embed, "k": embed + prev, "v": embed}) for h in induction_heads),
        "refined": root(head(*h, {w: embed + layer0 for w in "qkv"}) for h in induction_heads),
        "embed-only": root(head(*h, {w: embed for w in "qkv"}) for h in induction_heads),
        "k-all-layer0": root(head(*h, {"q": embed, "k": embed + layer0_real, "v": embed}) for h in induction_heads),
    }


def paren_hypotheses(n_layers: int, n_heads: int, pairs: list[tuple[int, int]] | None = None) -> dict:
    """Balanced-parentheses hypotheses in the reference's spirit (its high-level claims:
    the answer depends only on the count test and the horizon test):

      label-only       the final residual at the answer position is computed from an input
                       with the same answer;
      two-tests        every direct path into the output (the embeddings + first layers as
                       one stream, each last-layer head, the last MLP) draws its own input
                       that agrees on BOTH tests (count ok, horizon ok);
      count/horizon    the detailed claim: last-layer head `a` needs only the count test,
                       head `b` only the horizon test (the rest as in two-tests), for each
                       (a, b) in `pairs`.
    """
    from lens.circuits.scrubbing import MLP, Cond, Exact, Head, Node, Output, Resid, Uncond

    both = Cond("count_ok, horizon_ok", lambda t: np.stack([paren_features(t[:, 1:])[k]
                                                            for k in ("count_ok", "horizon_ok")], 1))
    count = Cond("count_ok", lambda t: paren_features(t[:, 1:])["count_ok"])
    horizon = Cond("horizon_ok", lambda t: paren_features(t[:, 1:])["horizon_ok"])
    label = Cond("balanced", lambda t: paren_features(t[:, 1:])["balanced"])
    last = n_layers - 1

    def direct(heads: dict) -> Node:
        kids = [Node(Resid(last), both), Node(MLP(last), both)]
        kids += [Node(Head(last, h), heads.get(h, both)) for h in range(n_heads)]
        return Node(Output(), Exact(), tuple(kids), other=Uncond())

    out = {"label-only": Node(Output(), Exact(), (Node(Resid(n_layers), label),), other=Uncond()),
           "two-tests": direct({})}
    for a, b in pairs or []:
        out[f"count:{last}.{a},horizon:{last}.{b}"] = direct({a: count, b: horizon})
    return out


# ------------------------------------------------------------------ synthetic induction
@dataclasses.dataclass(frozen=True)
class SyntheticInduction:
    """A 2-layer attention-only model trained on rows of random ids made of back-to-back
    pairs r + r, s + s, ... (each block's length uniform in [min_block, max_block], ids
    distinct within a block), so about half of every row is predictable, and only by
    copying: the offset of the earlier copy varies from block to block, so no positional
    head can stand in for an induction head.

    The defaults are the setup that formed the textbook circuit here (2026-12-07): one
    head per layer, rotary positions, untied embeddings, d 128, 1,500 steps of 64 rows;
    a layer-0 previous-token head and a layer-1 head attending from the second copy to
    the token after the earlier occurrence (induction score 0.98).  Which circuit forms
    depends on the run: with several layer-0 heads the model often copies through a
    shifted circuit instead (layer 1 matching k > 1 tokens back through one layer-0
    head and reading the answer through another at offset k - 1, induction score 0),
    which one head per layer makes harder but not impossible (seed 1 did it).  So
    `scripts/causal_scrubbing.py` checks every model before scrubbing it.  What did not
    copy well: filler + one repeat per row (a quarter of the tokens predictable), tied
    embeddings; learned absolute positions copied (loss 0.17) with no layer-1 induction
    head (a layer-0 head attended at a fixed offset).  docs/findings/causal_scrubbing.md has the runs."""

    vocab: int = 256
    d_model: int = 128
    n_heads: int = 1
    seq_len: int = 32
    min_block: int = 4
    max_block: int = 11
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    positional: str = "rope"
    tie_embeddings: bool = False
    skip_frac: float = 0.0
    seed: int = 0

    @staticmethod
    def smoke() -> "SyntheticInduction":
        """A few seconds of training (tests): the checks fail, the pipeline runs."""
        return SyntheticInduction(vocab=32, d_model=16, n_heads=2, seq_len=16, min_block=3, max_block=7, steps=20,
                                  batch_size=8)

    def tag(self) -> str:
        """A short fingerprint of the setup, for the cache folder (a changed setup retrains)."""
        import hashlib

        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def synthetic_rows(n: int, s: SyntheticInduction, seed: int, with_first: bool = False):
    """(rows [n, seq_len + 1], mask [n, seq_len] of the predictable targets: each block's
    second copy after its first token); with_first: also the mask of the first copies'
    targets after their first token (unpredictable).  rows[:, 0] is 0 (BOS); row i is
    r1 + r1 + r2 + r2 + ... cut at the row's end.  mask[i, t] marks target rows[i, t + 1]."""
    if not 1 <= s.min_block <= s.max_block or s.max_block > s.vocab - 1:
        raise ValueError(f"blocks need 1 <= min_block <= max_block <= vocab - 1; got min_block={s.min_block}, "
                         f"max_block={s.max_block}, vocab={s.vocab}")
    rng = np.random.default_rng(seed)
    width = s.seq_len + 1
    rows = np.zeros((n, width), np.int32)
    mask = np.zeros((n, s.seq_len), np.float32)
    first = np.zeros((n, s.seq_len), np.float32)
    ids = np.arange(1, s.vocab)
    for i in range(n):
        pos = 1
        while pos < width:
            b = int(rng.integers(s.min_block, s.max_block + 1))
            r = rng.choice(ids, b, replace=False)
            pair = np.concatenate([r, r])[:width - pos]
            rows[i, pos:pos + len(pair)] = pair
            # target rows[t] is predicted at t - 1: the second copy from its second token,
            # the first copy from its second token
            mask[i, pos + b:min(pos + 2 * b, width) - 1] = 1.0
            first[i, pos:min(pos + b, width) - 1] = 1.0
            pos += 2 * b
    return (rows, mask, first) if with_first else (rows, mask)


def skip_rows(n: int, s: SyntheticInduction, seed: int) -> np.ndarray:
    """[n, seq_len + 1] rows [BOS] + random ids where x[i+1] = perm(x[i-1]) at every odd
    i >= 2 (perm fixed by `s.seed`): predictable from the token two places back, which
    makes a layer-0 head attending one position back pay on its own (the previous-token
    head the induction circuit then composes with)."""
    perm = np.concatenate([[0], np.random.default_rng(s.seed + 5).permutation(np.arange(1, s.vocab))])
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, s.vocab, (n, s.seq_len + 1)).astype(np.int32)
    rows[:, 0] = 0
    for j in range(3, s.seq_len + 1, 2):
        rows[:, j] = perm[rows[:, j - 2]]
    return rows


def synthetic_config(s: SyntheticInduction) -> ModelConfig:
    """The 2-layer attention-only model of `s`."""
    rope = s.positional == "rope"
    return ModelConfig(
        architecture="llama" if rope else "gpt2", vocab_size=s.vocab, d_model=s.d_model, n_layers=2,
        n_heads=s.n_heads, n_kv_heads=s.n_heads, d_head=s.d_model // s.n_heads, d_mlp=0, max_seq_len=s.seq_len,
        norm_kind="rms" if rope else "layer", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
        positional="rope" if rope else "learned", attn_bias=not rope, attn_out_bias=not rope, mlp_bias=False,
        norm_bias=not rope, tie_embeddings=s.tie_embeddings, attn_only=True)


def synthetic_induction_model(out_dir: str | Path, s: SyntheticInduction = SyntheticInduction(),
                              progress: bool = False):
    """The synthetic-task model: loaded from out_dir/model (safetensors), else trained
    (resuming from out_dir's checkpoint) and saved, so it is trained once."""
    out_dir = Path(out_dir)
    if (out_dir / "model").exists():
        return models.load(out_dir / "model")[0]
    if s.positional not in ("rope", "learned"):
        raise ValueError(f"positional must be 'rope' or 'learned'; got {s.positional!r}")
    train_rows, _ = synthetic_rows(50000, s, s.seed + 1)
    if s.skip_frac > 0:
        k = int(round(len(train_rows) * s.skip_frac))
        mixed = np.concatenate([train_rows[k:], skip_rows(k, s, s.seed + 3)])
        train_rows = mixed[np.random.default_rng(s.seed + 4).permutation(len(mixed))]
    val_rows, _ = synthetic_rows(1024, s, s.seed + 2)
    tcfg = train.TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=50, eval_every=250,
                             eval_batches=8, checkpoint_every=250, seed=s.seed, weight_decay=0.0, min_lr_ratio=1.0)
    result = train.train(models.init(synthetic_config(s), jax.random.key(s.seed)), train_rows, val_rows, tcfg,
                         out_dir, train.TrainOptions(progress=progress,
                                                     run_info={"setup": dataclasses.asdict(s),
                                                               "task": "synthetic induction"}))
    models.save(result.model, out_dir / "model")
    (out_dir / "setup.json").write_text(json.dumps(dataclasses.asdict(s)) + "\n")
    return result.model


def synthetic_data(n: int, s: SyntheticInduction, seed: int = 1234, with_first: bool = False):
    """(tokens [n, seq_len], targets {"next", "mask"}) for `masked_nll`: the second copies;
    with_first: also the first copies' target mask [n, seq_len]."""
    rows, mask, first = synthetic_rows(n, s, seed, with_first=True)
    out = rows[:, :-1], {"next": rows[:, 1:], "mask": mask}
    return (*out, first) if with_first else out
