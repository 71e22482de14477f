"""lens.modularity.resume: a saved selective-pruning run is reused only under the
same key, reloads to exactly what the run returned, and a changed setting is refused."""

import dataclasses

import numpy as np
import pytest

from lens.modularity import pruning as M
from lens.modularity import resume as R
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(5)
FORGET = RNG.randint(0, VOCAB, size=(3, 7))
RETAIN = RNG.randint(0, VOCAB, size=(2, 7))


def _fail():
    raise AssertionError("a saved run was run again")


def test_saved_run_reloads_exactly_and_refuses_another_key(tmp_path):
    _, model, _ = tiny("llama")
    config = M.PruningConfig(steps=2, method="ratio", neuron_frac=0.1, chunk=2)
    key = {"config": dataclasses.asdict(config), "rows": R.rows_digest(FORGET, RETAIN)}
    calls = []

    def run():
        calls.append(1)
        return M.selective_pruning(model, FORGET, RETAIN, {"retain": RETAIN}, [], config)

    path = tmp_path / "runs" / "ratio.safetensors"
    records, nm, hm = R.saved_pruning_run(path, key, run)
    assert calls == [1] and path.is_file() and not path.with_name(path.name + ".tmp").exists()
    # the same key: loaded, not run; equal to the fresh result (an independent re-run, too)
    again, nm2, hm2 = R.saved_pruning_run(path, dict(key), _fail)
    assert again == records and np.array_equal(nm2, nm) and np.array_equal(hm2, hm)
    fresh, nm3, _ = M.selective_pruning(model, FORGET, RETAIN, {"retain": RETAIN}, [], config)
    assert np.array_equal(nm3, nm)
    assert records[-1]["retain"]["loss"] == pytest.approx(fresh[-1]["retain"]["loss"], rel=1e-6)
    assert [r["neurons_pruned"] for r in records] == [r["neurons_pruned"] for r in fresh]
    # another setting or other data: refused, naming what differs
    other = {**key, "config": dataclasses.asdict(dataclasses.replace(config, neuron_frac=0.2))}
    with pytest.raises(ValueError, match=r"other settings \(differs in \['config'\]\)"):
        R.saved_pruning_run(path, other, _fail)
    with pytest.raises(ValueError, match="rows"):
        R.saved_pruning_run(path, {**key, "rows": R.rows_digest(RETAIN, FORGET)}, _fail)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        R.saved_pruning_run(tmp_path / "x.safetensors", {"bad": object()}, _fail)


def test_rows_digest_sees_values_shapes_and_dtypes():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert R.rows_digest(a) == R.rows_digest(a.copy())
    assert R.rows_digest(a) != R.rows_digest(a.reshape(4, 3))
    assert R.rows_digest(a) != R.rows_digest(a.astype(np.int64))
    b = a.copy()
    b[2, 3] += 1
    assert R.rows_digest(a) != R.rows_digest(b)
    assert R.rows_digest(a, b) != R.rows_digest(b, a)


def test_saved_result_refuses_a_truncated_file_and_a_nan_key(tmp_path):
    """A half-written or foreign file is named and left alone (never overwritten); a key
    with NaN is refused before anything runs (it could never match itself on reload)."""
    path = tmp_path / "x.safetensors"
    arrays, info = R.saved_result(path, {"a": 1}, lambda: ({"w": np.arange(7.0)}, {"log": [1, 2]}))
    assert info == {"log": [1, 2]} and np.array_equal(arrays["w"], np.arange(7.0))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"x.safetensors is not a readable saved run .*delete it"):
        R.saved_result(path, {"a": 1}, _fail)
    assert path.read_bytes() == whole[: len(whole) // 2]
    with pytest.raises(TypeError, match="JSON-serialisable"):
        R.saved_result(tmp_path / "y.safetensors", {"lr": float("nan")}, _fail)
    assert not (tmp_path / "y.safetensors").exists()
