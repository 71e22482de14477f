"""Both readings of a finished main-job run: shared component vs few distinct effects.

    python scripts/orthogonal_readings.py --run runs/orthogonal_<time> [--controls 5]

Reads the run's vectors (theta0 and the found MELBO-ortho vectors) and settings, rebuilds
the model and the analysis prompts, and reports per stage (`lens.steering.melbo.stages.answer`):
raw PR, the shared share of effect energy and the specific (centred) PR, with bootstrap
intervals over tokens, the same for random orthogonal controls drawn with several seeds
(mean, min, max), the cosine of the shared part with theta0's own effect, and the closed
form pooled per token.  Writes readings.json, readings.md and readings.png into the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import numpy as np  # noqa: E402

from lens.steering import melbo, vectors  # noqa: E402
from lens.cli import Preset, fill_from_preset, int_at_least  # noqa: E402
from lens.steering.melbo import stages  # noqa: E402
from lens.steering.prompts import NEUTRAL, load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report writer, also under runpy
from orthogonal_report import k_curve_plot, readings_plot  # noqa: E402
from figures import answer_lines  # noqa: E402  (scripts/)
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

PRESETS = {"smoke": Preset(controls=1, n_boot=20, prompts=2), "default": Preset(controls=5, n_boot=200, prompts=4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a main-job output folder (report.json, vectors.safetensors)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--random-weights", action="store_true", help="the run used --random-weights")
    p.add_argument("--k-curve", type=_ks, help="also PR vs K for these K (first K found vs one control draw)")
    p.add_argument("--controls", type=int_at_least(1), help="random-control seeds (default: preset)")
    p.add_argument("--n-boot", type=int_at_least(10), help="bootstrap draws (default: preset)")
    p.add_argument("--prompts", type=int_at_least(1), help="analysis prompts, every real token counts (default: preset)")
    args = p.parse_args(argv)
    fill_from_preset(args, PRESETS[args.preset])
    run = Path(args.run)
    if not ((run / "vectors.safetensors").is_file() or (run / "checkpoint.safetensors").is_file()):
        p.error(f"--run {run}: neither vectors.safetensors nor checkpoint.safetensors "
                "(is it a scripts/orthogonal_steering.py run?)")
    if args.k_curve is not None and (len(args.k_curve) == 0 or min(args.k_curve) < 2):
        p.error("--k-curve needs sizes >= 2, e.g. --k-curve 2,4,8,16,32,64")
    return args


def _ks(text: str) -> list[int]:
    return sorted({int(k) for k in text.split(",") if k.strip()})


def read_run(run: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(model and layers, theta0, found vectors): from a finished run's vectors file, or
    from the checkpoint of a run still training (its first n_done vectors).  Reads the
    files `lens.steering.vectors.save_vectors` writes, and the string-metadata files of runs made
    before it did."""
    from safetensors import safe_open

    finished = (run / "vectors.safetensors").is_file()
    path = run / ("vectors.safetensors" if finished else "checkpoint.safetensors")
    try:
        found, meta = vectors.load_vectors(path)
        theta0 = vectors.load_extras(path)["theta0"]
    except ValueError:  # an older run: plain safetensors, string metadata
        with safe_open(str(path), "np") as f:
            meta = {k: json.loads(v) if v.lstrip("-").replace(".", "", 1).isdigit() else v
                    for k, v in (f.metadata() or {}).items()}
            theta0 = f.get_tensor("theta0")
            found = f.get_tensor("found" if finished else "vectors")
    if not finished:
        found = found[: int(meta["n_done"])]
    info = {"model": meta["model"], "source_layer": int(meta["source_layer"]),
            "target_layer": int(meta["target_layer"])}
    return info, np.asarray(theta0, np.float32).reshape(-1), np.asarray(found, np.float32)


def answer(ans: dict) -> list[str]:
    """The report's opening: per stage, the shared component's share and the specific
    participation ratio of the found vectors against the random control."""
    k = ans["choices"]["k"]
    parts = []
    for stage in ans["participation_ratio"]:
        sh, sp = ans["shared_share"][stage], ans["specific_participation_ratio"][stage]
        parts.append(f"{stage}: shared share {sh['found']:.2f} (control {sh['control_mean']:.2f}), specific PR "
                     f"{sp['found']:.1f} of {k - 1} (control {sp['control_mean']:.1f})")
    return answer_lines("; ".join(parts) + ".")


def write_markdown(path: Path, ans: dict, settings: dict) -> None:
    from orthogonal_report import readings_lines

    text = [f"# Both readings ({settings.get('model')}, K = {ans['choices']['k']})", "", *answer(ans),
            "Control = random vectors orthogonal to theta0 and each other with the found norms; "
            f"{len(ans['choices']['control_seeds'])} seeds (mean, min-max).", "", *readings_lines(ans)]
    path.write_text("\n".join(text) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = Path(args.run)
    t0 = time.time()
    report, theta0, found = read_run(run)
    settings = {"model": report["model"], "random_weights": args.random_weights, "k_found": len(found)}
    model, _, make = load_model(report["model"], args.random_weights)
    s, t = report["source_layer"], report["target_layer"]
    toks, mask = melbo.pad_prompts([make(p) for p in NEUTRAL[: args.prompts]])
    problem = melbo.make_problem(model, toks, mask, s, t)
    s_factor = stages.logit_metric_factor(model)  # once for both calls
    ans = stages.answer(problem, found, theta0, control_seeds=tuple(range(args.controls)), n_boot=args.n_boot,
                        progress=True, s_factor=s_factor)
    if args.k_curve:
        ks = [k for k in args.k_curve if k <= len(found)]
        ans["pr_vs_k"] = stages.k_curve(problem, found, theta0, ks, progress=True, s_factor=s_factor)
        k_curve_plot(run / "pr_vs_k.png", ans["pr_vs_k"])
    ans["timing_s"] = round(time.time() - t0, 1)
    (run / "readings.json").write_text(json.dumps({k: v for k, v in ans.items() if k not in stages.NOT_JSON}, indent=1))
    write_markdown(run / "readings.md", ans, settings)
    readings_plot(run / "readings.png", ans)
    print((run / "readings.md").read_text())
    print(f"wrote {run}/readings.* in {ans['timing_s']} s")
    return ans


if __name__ == "__main__":
    main()
