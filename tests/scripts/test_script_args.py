"""Every script (scripts/ and the benchmarks in bench/) refuses a bad command-line value up
front, with argparse's message naming the flag (exit status 2), before loading any model;
good values parse.  Only the parsers run here (no model, no data): each file is executed
with runpy (tests/script_entry.py), never imported."""

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)
from script_entry import script_namespace

GOOD = {
    "orthogonal_steering": [],
    "steer": [],
    "generate": [],
    "logit_geometry": [],
    "train_toy": ["--preset", "smoke", "--out", "x"],
    "forward_generate": [],
    "melbo": [],
    "steering_sweep": [],
    "train": [],
    "train_tuned_lens": ["--out", "x"],
    "lens_report": ["--out", "x"],
    "dla_norm": ["--out", "x"],
    "causal_scrubbing": ["--example", "induction", "--out", "x"],
    "scrubbing": [],
    "generation": [],
    "modularity": ["--out", "x"],
    "bench/modularity": [],
    "goodhart": ["--out", "x"],
    "prediction": [],
    "patching": ["--out", "x"],
    "bench/patching": [],
    "plan": [],
}
BAD = [
    ("plan", ["--workload", "dance"], "argument --workload: invalid choice"),
    ("train_tuned_lens", ["--out", "x", "--steps", "0"], "argument --steps"),
    ("train_tuned_lens", ["--out", "x", "--seq", "1"], "argument --seq: must be an integer >= 2"),
    ("train_tuned_lens", ["--out", "x", "--lr-scale", "0"], "argument --lr-scale: must be > 0"),
    ("train_tuned_lens", ["--out", "x", "--corpora", "wiki"], "argument --corpora: invalid choice"),
    ("train_tuned_lens", ["--out", "x", "--eval-every", "0"], "argument --eval-every"),
    ("train_tuned_lens", ["--out", "x", "--accumulate", "0"], "argument --accumulate: must be an integer >= 1"),
    ("train_tuned_lens", ["--out", "x", "--preset", "huge"], "argument --preset: invalid choice"),
    ("train_tuned_lens", ["--out", "x", "--preset", "big"], "argument --preset: invalid choice"),
    ("train_tuned_lens", ["--out", "x", "--layers", "5,x"], "argument --layers: must be 'all' or comma-separated"),
    ("train_tuned_lens", ["--out", "x", "--layers", "-1"], "argument --layers: layer indices must be >= 0"),
    ("lens_report", ["--out", "x", "--prompt", " "], "argument --prompt: an empty prompt"),
    ("lens_report", ["--out", "x", "--positions", "0"], "argument --positions"),
    ("lens_report", ["--out", "x", "--tuned", "/nonexistent/lens.safetensors"], "no such file"),
    ("dla_norm", ["--out", "x", "--permutations", "1"], "argument --permutations: must be an integer >= 2"),
    ("dla_norm", ["--out", "x", "--prompts", "0"], "argument --prompts"),
    ("bench/modularity", ["--tokens", "5"], "argument --tokens: must be an integer >= 128"),
    ("bench/modularity", ["--batch", "0"], "argument --batch"),
    ("bench/modularity", ["--sides", "ours,torch"], "argument --sides: choose a comma-separated subset"),
    ("bench/modularity", ["--rounds", "0"], "argument --rounds"),
    ("modularity", [], "the following arguments are required: --out"),
    ("modularity", ["--out", "x", "--sections", "pruning"], "--sections: choose from"),
    ("modularity", ["--out", "x", "--sections", "steering"], "steering needs selective_pruning"),
    ("modularity", ["--out", "x", "--preset", "huge"], "argument --preset: invalid choice"),
    ("modularity", ["--out", "x", "--eval-split", "train"], "argument --eval-split: invalid choice"),
    ("modularity", ["--out", "x", "--fractions", "0.5,2"], "--fractions must be in (0, 1]"),
    ("modularity", ["--out", "x", "--prune-frac", "0"], "argument --prune-frac: must be > 0"),
    ("modularity", ["--out", "x", "--steer-rho", "0"], "argument --steer-rho: must be > 0"),
    ("modularity", ["--out", "x", "--steer-seeds", "0"], "argument --steer-seeds"),
    ("modularity", ["--out", "x", "--prune-frac", "0.5", "--prune-steps", "3"], "prunes more than every neuron"),
    ("modularity", ["--out", "x", "--expert-size", "0"], "argument --expert-size"),
    ("modularity", ["--out", "x", "--steer-prompts", "9"], "--steer-prompts: at most 4"),
    ("goodhart", ["--out", "x", "--preset", "huge"], "argument --preset: invalid choice"),
    ("goodhart", ["--out", "x", "--steps", "0"], "argument --steps: must be an integer >= 1; got 0"),
    ("goodhart", ["--out", "x", "--tau", "-1"], "argument --tau: must be > 0"),
    ("goodhart", ["--out", "x", "--parts", "sweep,nope"], "argument --parts: must be a comma-separated subset"),
    ("prediction", ["--tokens", "0"], "argument --tokens: must be an integer >= 1; got 0"),
    ("prediction", ["--vocab", "8"], "argument --vocab: must be an integer >= 16; got 8"),
    ("prediction", ["--sides", "ours,jax"], "argument --sides: unknown side(s) ['jax']"),
    ("patching", ["--out", "x", "--preset", "huge"], "argument --preset: invalid choice"),
    ("patching", ["--out", "x", "--pairs", "0"], "argument --pairs"),
    ("patching", ["--out", "x", "--layers", "0"], "argument --layers"),
    ("patching", ["--out", "x", "--memory-budget", "-1"], "argument --memory-budget: must be > 0"),
    ("patching", ["--preset", "smoke"], "the following arguments are required: --out"),
    ("patching", ["--out", "x", "--sites", "resid,embed"], "argument --sites: must be comma-separated names"),
    ("patching", ["--out", "x", "--tasks", ""], "argument --tasks: must be comma-separated names"),
    ("patching", ["--out", "x", "--corruptions", "s2,xyz"], "argument --corruptions: must be comma-separated names"),
    ("bench/patching", ["--pairs", "0"], "argument --pairs"),
    ("bench/patching", ["--reference-pairs", "0"], "argument --reference-pairs"),
    ("bench/patching", ["--memory-budget", "0"], "argument --memory-budget: must be > 0"),
    ("orthogonal_steering", ["--k", "0"], "argument --k: must be an integer >= 1; got 0"),
    ("orthogonal_steering", ["--k", "two"], "argument --k: must be an integer >= 1; got 'two'"),
    ("orthogonal_steering", ["--block", "0"], "argument --block"),
    ("orthogonal_steering", ["--steps", "-1"], "argument --steps"),
    ("orthogonal_steering", ["--lr", "0"], "argument --lr: must be > 0"),
    ("orthogonal_steering", ["--lr", "nan"], "argument --lr: must be a finite number"),
    ("orthogonal_steering", ["--rho-grid", "0.1,,1"], "argument --rho-grid: must be comma-separated"),
    ("orthogonal_steering", ["--rho-grid", "0.1,-1"], "argument --rho-grid: must be > 0"),
    ("orthogonal_steering", ["--base-rho-grid", ""], "argument --base-rho-grid"),
    ("orthogonal_steering", ["--base-rho", "-0.5"], "argument --base-rho: must be > 0"),
    ("orthogonal_steering", ["--source", "-1"], "argument --source"),
    ("orthogonal_steering", ["--source", "4", "--target", "4"], "--target 4 must be a later block than --source 4"),
    ("orthogonal_steering", ["--train-prompts", "9"], "argument --train-prompts: at most 4"),
    ("orthogonal_steering", ["--gen-prompts", "0"], "argument --gen-prompts"),
    ("orthogonal_steering", ["--reply-tokens", "0"], "argument --reply-tokens"),
    ("orthogonal_steering", ["--gen-batch", "0"], "argument --gen-batch"),
    ("orthogonal_steering", ["--chunk", "0"], "argument --chunk"),
    ("orthogonal_steering", ["--compare-k", "-1"], "argument --compare-k"),
    ("orthogonal_steering", ["--mode", "fast"], "argument --mode: invalid choice"),
    ("orthogonal_steering", ["--objective-positions", "first"], "argument --objective-positions: invalid choice"),
    ("orthogonal_steering", ["--resume"], "--resume continues the run in --out"),
    ("steer", ["--layer", "-2"], "argument --layer"),
    ("steer", ["--coeffs", "1", "inf"], "argument --coeffs: must be a finite number"),
    ("steer", ["--max-new-tokens", "0"], "argument --max-new-tokens"),
    ("steer", ["--temperature", "-1"], "argument --temperature: must be >= 0"),
    ("steer", ["--positive", "a", "b", "--negative", "c"], "--method caa pairs the texts"),
    ("steer", ["--prompts", " "], "argument --prompts: an empty text"),
    ("generate", ["--max-new-tokens", "0"], "argument --max-new-tokens"),
    ("generate", ["--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
    ("generate", ["--temperature", "-0.1"], "argument --temperature"),
    ("generate", ["--seed", "-1"], "argument --seed"),
    ("logit_geometry", ["--pairs", "0"], "argument --pairs"),
    ("logit_geometry", ["--steer-norms", "1", "0"], "argument --steer-norms: must be > 0"),
    ("logit_geometry", ["--layer", "-1"], "argument --layer"),
    ("logit_geometry", ["--no-default"], "nothing to analyse"),
    ("train_toy", ["--preset", "smoke", "--out", "x", "--steps", "0"], "argument --steps"),
    ("train_toy", ["--preset", "smoke", "--out", "x", "--checkpoint-every", "0"], "argument --checkpoint-every"),
    ("train_toy", ["--preset", "nope", "--out", "x"], "argument --preset: invalid choice"),
    ("forward_generate", ["--batch", "0"], "argument --batch"),
    ("forward_generate", ["--threads", "0"], "argument --threads"),
    ("forward_generate", ["--seq", "8", "--prompt-len", "9"], "--prompt-len 9 is longer than --seq 8"),
    ("melbo", ["--blocks", "8,0"], "argument --blocks: must be an integer >= 1; got 0"),
    ("melbo", ["--blocks", "8,,2"], "argument --blocks: must be comma-separated"),
    ("melbo", ["--source", "9", "--target", "3"], "--target 3 must be a later block than --source 9"),
    ("melbo", ["--steps", "0"], "argument --steps"),
    ("steering_sweep", ["--vectors", "0"], "argument --vectors"),
    ("steering_sweep", ["--norm", "-8"], "argument --norm: must be > 0"),
    ("train", ["--batch", "0"], "argument --batch"),
    ("generation", ["--vectors", "0"], "argument --vectors"),
    ("generation", ["--new-tokens", "1"], "argument --new-tokens: must be an integer >= 2"),
    ("generation", ["--vectors", "4", "--loop-vectors", "8"], "--loop-vectors 8 is more than --vectors 4"),
    ("train", ["--d-model", "30", "--heads", "4"], "--d-model 30 must be a multiple of --heads 4"),
    ("orthogonal_steering", ["--preset", "huge"], "argument --preset: invalid choice"),
    ("orthogonal_steering", ["--k-curve", "1,4"], "--k-curve sizes must lie in [2, --k = 16]"),
    ("orthogonal_steering", ["--k-curve", "8,32"], "--k-curve sizes must lie in [2, --k = 16]"),
    ("orthogonal_steering", ["--control-seeds", "0"], "argument --control-seeds"),
    ("orthogonal_steering", ["--readings-prompts", "9"], "argument --readings-prompts: at most 4"),
    ("causal_scrubbing", ["--example", "ioi", "--out", "x"], "argument --example: invalid choice"),
    ("causal_scrubbing", ["--example", "parens", "--out", "x", "--n", "1"], "argument --n: must be an integer >= 2"),
    ("causal_scrubbing", ["--example", "parens", "--out", "x", "--seeds", "0"], "argument --seeds"),
    ("causal_scrubbing", ["--example", "parens", "--out", "x", "--memory-gb", "0"], "argument --memory-gb: must be > 0"),
    ("causal_scrubbing", ["--example", "parens"], "the following arguments are required: --out"),
    ("causal_scrubbing", ["--example", "induction", "--out", "x", "--train-seed", "-1"], "argument --train-seed"),
    ("causal_scrubbing", ["--example", "induction", "--out", "x", "--vocab", "8"], "argument --vocab: must be an integer >= 16"),
    ("scrubbing", ["--examples", "1"], "argument --examples"),
    ("scrubbing", ["--repeats", "0"], "argument --repeats"),
    ("scrubbing", ["--torch-threads", "0"], "argument --torch-threads"),
    ("scrubbing", ["--workers", "0"], "argument --workers"),
]


def _module(script):
    """The entry point's globals (scripts/ first, "bench/<name>" for a bench file a script shadows)."""
    return script_namespace(script)


@pytest.mark.parametrize("script,argv,message", BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD])
def test_bad_value_is_refused_with_a_clear_message(script, argv, message, capsys):
    parse_args = _module(script)["parse_args"]
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(GOOD))
def test_defaults_parse(script):
    assert _module(script)["parse_args"](GOOD[script]) is not None


def test_orthogonal_steering_grids_parse_to_numbers():
    args = _module("orthogonal_steering")["parse_args"](["--rho-grid", "0.1, 3", "--k", "2"])
    assert args.rho_grid == [0.1, 3.0] and args.base_rho_grid == [0.25, 0.35, 0.5, 0.75] and args.k == 2


def test_orthogonal_steering_checks_blocks_against_the_model():
    script = _module("orthogonal_steering")
    layers, parse_args = script["layers"], script["parse_args"]
    assert layers(parse_args([]), 30) == (7, 15)  # the default model's 30 blocks
    with pytest.raises(SystemExit, match="blocks 0..3"):
        layers(parse_args(["--target", "4"]), 4)


def test_orthogonal_steering_presets():
    parse_args = _module("orthogonal_steering")["parse_args"]
    large = parse_args(["--preset", "large"])
    assert large.k == 256 and large.k_curve == [2, 4, 8, 16, 32, 64, 128, 192, 256] and large.rho_grid == [1.0]
    assert large.gen_vectors == 16  # generations shown for 16; every vector is scored on the behaviour prompts
    smoke = parse_args(["--preset", "smoke", "--k", "6"])  # an explicit flag wins over the preset
    assert smoke.k == 6 and smoke.steps == 10 and smoke.base_rho_grid == [0.35, 0.5]
    assert parse_args([]).k == 16


def test_no_test_imports_a_script_or_benchmark():
    """Tests import only lens, models and tests/ helpers: scripts/ and bench/ are driven by
    their command line (tests/script_entry.py), so a static scan of every test's imports
    (at any depth) finds none of their module names, and no test puts them on sys.path."""
    import ast

    from script_entry import ROOT

    entry_names = {p.stem for folder in ("scripts", "bench") for p in (ROOT / folder).glob("*.py")}
    bad = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        names, path_edits = set(), 0
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"):
                path_edits += 1
        hit = sorted(names & entry_names) + (["sys.path"] if path_edits and path.name != "script_entry.py" else [])
        if hit:
            bad[str(path.relative_to(ROOT))] = hit
    assert not bad, bad
