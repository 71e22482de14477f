"""lens.steering.vectors.generate_with_vectors equals K separate steered generations; reply CAA;
lens/, models/ and scripts/ never import bench/, torch or transformers (a static scan of
the source)."""

import ast
from pathlib import Path

import numpy as np
import pytest

from lens.core import edits as E
from lens.steering import vectors as V
from lens_tiny import VOCAB, tiny
from lens.models.generation.generate import GenerationConfig, generate

RNG = np.random.RandomState(5)
PROMPTS = [list(RNG.randint(0, VOCAB, size=n)) for n in (5, 9, 7)]  # odd lengths, padded
ROOT = Path(__file__).resolve().parents[3]


def reference_generation(model, prompt, vector, layer, n, coeff, row, temperature=0.0, top_k=None, seed=0):
    """Independent of the cached decode: every step runs the FULL uncached forward of the
    sequence so far (right-padded to one length, one compiled call) with the vector added at
    resid_pre[layer], then greedy argmax, or temperature -> top-k -> jax.random.categorical
    with the documented key fold_in(fold_in(key(seed), row), step)."""
    import jax
    import jax.numpy as jnp

    e = E.add(model, vector, layer, coeff)
    width = len(prompt) + n
    fwd = jax.jit(lambda t, m: model(t, attention_mask=m, edits=e))
    seq = list(prompt)
    for step in range(n):
        toks = np.zeros(width, np.int32)
        toks[: len(seq)] = seq
        logits = np.asarray(fwd(jnp.asarray(toks), jnp.asarray(np.arange(width) < len(seq))))[len(seq) - 1]
        if temperature == 0:
            seq.append(int(np.argmax(logits)))
            continue
        z = logits / np.float32(temperature)
        if top_k is not None:
            z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row), step)
        seq.append(int(jax.random.categorical(key, jnp.asarray(z, jnp.float32))))
    return seq[len(prompt):]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=20, seed=3)])
def test_generate_with_vectors_equals_separate_runs(sampling):
    """K = 3 vectors x P = 3 prompts of odd lengths (left-padded together): every row equals
    the independent full-forward loop for that vector and prompt, token for token (greedy)
    and draw for draw (sampled, row p's keys); the same in calls of 2 vectors (the last
    padded with a zero vector).  Tolerance: exact token ids."""
    _, model, _ = tiny()
    vectors = 3.0 * RNG.randn(3, model.config.d_model).astype(np.float32)
    config = GenerationConfig(6, eos_token_ids=(), **sampling)
    out = V.generate_with_vectors(model, PROMPTS, vectors, 1, config, coeff=1.5, progress=False)
    assert out.shape == (3, 3, 6) and out.dtype == np.int32
    for k in range(3):
        for p, prompt in enumerate(PROMPTS):
            ref = reference_generation(model, prompt, vectors[k], 1, 6, 1.5, p, **sampling)
            assert out[k, p].tolist() == ref, (k, p)
    chunked = V.generate_with_vectors(model, PROMPTS, vectors, 1, config, coeff=1.5,
                                      vectors_per_call=2, progress=False)
    np.testing.assert_array_equal(chunked, out)
    unsteered = V.generate_with_vectors(model, PROMPTS[:1], np.zeros((1, model.config.d_model)), 0,
                                        GenerationConfig(4, eos_token_ids=()), progress=False)
    assert unsteered[0, 0].tolist() == reference_generation(model, PROMPTS[0], np.zeros(model.config.d_model),
                                                            0, 4, 1.0, 0)
    with pytest.raises(ValueError, match="d_model"):
        V.generate_with_vectors(model, PROMPTS, np.ones((2, 5)), 1, GenerationConfig(3))
    with pytest.raises(ValueError, match=r"layer 7 out of range \["):
        V.generate_with_vectors(model, PROMPTS, vectors, 7, GenerationConfig(3))
    with pytest.raises(ValueError, match="vectors_per_call"):
        V.generate_with_vectors(model, PROMPTS, vectors, 1, GenerationConfig(3), vectors_per_call=0)


def test_generate_with_vectors_pads_after_eos_and_chunks_by_memory():
    """Rows that hit an EOS hold the pad id after it; a tiny memory budget gives one vector
    per call with the same tokens."""
    _, model, _ = tiny()
    vectors = 2.0 * RNG.randn(4, model.config.d_model).astype(np.float32)
    free = V.generate_with_vectors(model, PROMPTS, vectors, 2, GenerationConfig(5, eos_token_ids=()),
                                   progress=False)
    eos = int(free[0, 0, 1])  # make row (0, 0)'s second token an EOS
    out = V.generate_with_vectors(model, PROMPTS, vectors, 2, GenerationConfig(5, eos_token_ids=[eos], pad_token_id=0),
                                  progress=False)
    for k in range(4):
        for p in range(3):
            row = free[k, p].tolist()
            stop = next((j + 1 for j, t in enumerate(row) if t == eos), 5)
            assert out[k, p].tolist() == row[:stop] + [0] * (5 - stop), (k, p)
    first = free[0, 0].tolist()
    assert V.new_token_lists(out, [eos])[0][0] == first[: first.index(eos) + 1]
    assert V.vectors_per_call_for(model, 3, 9, 5, memory_budget=1.0) == 1
    small = V.generate_with_vectors(model, PROMPTS, vectors, 2, GenerationConfig(5, eos_token_ids=()), progress=False,
                                    memory_budget=1.0)
    np.testing.assert_array_equal(small, free)


def test_reply_mean_difference_reads_the_reply_positions():
    _, model, _ = tiny()
    a, b = PROMPTS[:2], PROMPTS[1:]
    v = V.reply_mean_difference(model, a, b, 2, 3)
    # independent: generate each reply alone, read resid_pre[2] of prompt + reply
    def mean_of(prompts):
        rows = []
        for p in prompts:
            r = generate(model, p, GenerationConfig(3, eos_token_ids=())).tokens[0]
            x = np.asarray(V.resid_at(model, np.asarray(p + r, np.int32), 2))
            rows.append(x[len(p) - 1: len(p) + 2].mean(0))
        return np.mean(rows, 0)
    np.testing.assert_allclose(v, mean_of(a) - mean_of(b), atol=1e-5)


@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_calibrate_norm_picks_by_the_score_of_separate_generations():
    """Every design x rho scored from generations run one at a time (`generate` with
    `edits.add`), then the rule: best mean score, then smallest rho, then earlier design;
    nothing scoring > 0 falls back to the first design at the smallest rho."""
    _, model, _ = tiny()
    d = model.config.d_model
    rs = np.random.RandomState(11)
    designs = {"a": rs.randn(d).astype(np.float32), "b": rs.randn(d).astype(np.float32)}
    grid, ref_norm, layer, n = [3.0, 0.5, 1.5], 2.0, 1, 4  # an unsorted grid
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    score = lambda text: float(np.mean([int(t) % 3 == 0 for t in text.split()]))  # noqa: E731

    vec, info = V.calibrate_norm(model, designs, PROMPTS[:2], layer, ref_norm, grid, n, score, decode,
                                        vectors_per_call=4)
    expect = {}
    for name, v in designs.items():
        for rho in grid:
            e = E.add(model, v / np.linalg.norm(v) * rho * ref_norm, layer)
            texts = [decode(generate(model, p, GenerationConfig(n), edits=e).tokens[0]) for p in PROMPTS[:2]]
            expect[(name, rho)] = np.mean([score(t) for t in texts])
    got = {(r["design"], r["rho"]): r["score"] for r in info["table"]}
    assert got.keys() == expect.keys()
    for key in expect:
        assert got[key] == pytest.approx(expect[key]), key
    order = ["a", "b"]
    best = max(expect, key=lambda k: (expect[k], -k[1], -order.index(k[0])))
    assert (info["design"], info["rho"]) == best and info["scored"] == (expect[best] > 0)
    v = designs[best[0]]
    np.testing.assert_allclose(vec, v / np.linalg.norm(v) * best[1] * ref_norm, rtol=1e-6)
    assert set(info["examples"]) == {f"{k}@{r}" for k, r in expect}

    vec0, info0 = V.calibrate_norm(model, designs, PROMPTS[:1], layer, ref_norm, grid, 2,
                                          lambda text: 0.0, decode)
    assert (info0["design"], info0["rho"], info0["scored"]) == ("a", 0.5, False)
    np.testing.assert_allclose(np.linalg.norm(vec0), 0.5 * ref_norm, rtol=1e-6)
    with pytest.raises(ValueError, match="rho_grid"):
        V.calibrate_norm(model, designs, PROMPTS[:1], layer, ref_norm, [0.0, 1.0], 2, score, decode)
    with pytest.raises(ValueError, match="zero vector"):
        V.calibrate_norm(model, {"z": np.zeros(d)}, PROMPTS[:1], layer, ref_norm, grid, 2, score, decode)


def test_vector_files_hold_extras_and_json_metadata(tmp_path):
    v = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    losses = np.arange(12, dtype=np.float32).reshape(3, 4)
    meta = {"model": "m", "layer": 3, "site": "resid_pre", "method": "melbo-ortho", "lr": 0.3, "n_done": 3}
    path = tmp_path / "run.safetensors"
    V.save_vectors(path, v, meta, extras={"losses": losses, "theta0": v[0]})
    got, m = V.load_vectors(path)
    np.testing.assert_array_equal(got, v)
    assert {k: m[k] for k in meta} == meta  # types survive: int 3, float 0.3
    ex = V.load_extras(path)
    assert set(ex) == {"losses", "theta0"}
    np.testing.assert_array_equal(ex["losses"], losses)
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="'vectors'"):
        V.save_vectors(path, v, meta, extras={"vectors": v})
    from safetensors.numpy import save_file

    save_file({"theta0": v[0]}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'vectors' tensor"):
        V.load_vectors(tmp_path / "other.safetensors")


FORBIDDEN = ("bench", "torch", "transformers")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_test_only_dependency():
    """lens/, models/ and scripts/ (`make run`, `--random-weights` included) run on a
    runtime-only install: no bench/, torch or transformers, at any depth of a module
    (imports inside functions count)."""
    bad = {}
    # bench/'s modules by their own names too (a script could reach them through sys.path)
    forbidden = set(FORBIDDEN) | {p.stem for p in (ROOT / "bench").glob("*.py")}
    for folder in ("lens", "models", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            hit = _imports(path) & forbidden
            if hit:
                bad[str(path.relative_to(ROOT))] = sorted(hit)
    assert not bad, bad
