"""Per-layer top tokens of a prompt through the logit lens (and a tuned lens): heatmap + table.

    .venv/bin/python scripts/lens_report.py --prompt "The capital of France is the city of" --out runs/lens
    .venv/bin/python scripts/lens_report.py --tuned runs/tuned_smollm2/tuned_lens.safetensors --out runs/lens
    .venv/bin/python scripts/lens_report.py --preset smoke --out /tmp/lens

For every layer l (resid_pre[l]; the last row is the model's output) and each of the last
--positions positions: the lens's top-1 token and its probability (the heatmap's colour),
for the logit lens (the final norm's own statistics per layer, or --frozen-scale: the last
layer's divisor for every layer) and, with --tuned, a tuned lens from
scripts/train_tuned_lens.py.  Writes lens_report.png, report.md (the compact text table)
and report.json to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.cli import Preset, fill_from_preset, int_at_least  # noqa: E402
from lens.readout.logit_lens import load_tuned_lens, logit_lens, tuned_lens  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402
from figures import answer_lines  # noqa: E402  (scripts/)

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

PRESETS = {"default": Preset(prompt="The capital of France is the city of", positions=8),
           "smoke": Preset(prompt="The capital of France is", positions=3)}


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty prompt")
    return text


def parse_args(argv=None):
    """The command line, checked before any model is loaded."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or model folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--prompt", type=nonempty, default=None, help="plain text (override)")
    ap.add_argument("--positions", type=int_at_least(1), default=None, help="last N positions shown (override)")
    ap.add_argument("--tuned", type=Path, default=None, help="a tuned_lens.safetensors of this model")
    ap.add_argument("--frozen-scale", action="store_true", help="logit lens with the last layer's norm divisor")
    args = ap.parse_args(argv)
    fill_from_preset(args, PRESETS[args.preset])
    if args.tuned is not None and not args.tuned.is_file():
        ap.error(f"--tuned {args.tuned}: no such file")
    return args


def top_tokens(logp: np.ndarray, tokenizer) -> tuple[list[list[str]], np.ndarray]:
    """[layers][positions] top-1 token texts and their probabilities."""
    ids = logp.argmax(-1)
    probs = np.exp(np.take_along_axis(logp, ids[..., None], -1)[..., 0])
    return [[tokenizer.decode([int(i)]) for i in row] for row in ids], probs


def table(name: str, words, probs, inputs: list[str]) -> list[str]:
    esc = lambda s: repr(s)[1:-1].replace("|", "\\|")[:12]  # noqa: E731
    lines = [f"### {name}", "", "| layer | " + " | ".join(f"`{esc(t)}`" for t in inputs) + " |",
             "|---" * (len(inputs) + 1) + "|"]
    for layer in range(len(words)):
        cells = [f"{esc(w)} {p:.2f}" for w, p in zip(words[layer], probs[layer])]
        label = "out" if layer == len(words) - 1 else str(layer)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def answer(panels: list[tuple[str, list, np.ndarray]]) -> list[str]:
    """The report's opening: the model's next token at the last position and, per lens, the
    first layer from which the lens reads it (and keeps reading it); a verdict when the
    model's own prediction is too weak for a lens to have anything to read."""
    _, words, probs = panels[0]
    final, p = words[-1][-1], float(probs[-1][-1])
    parts = []
    for name, w, _ in panels:
        rows = [row[-1] for row in w]
        first = next((i for i in range(len(rows)) if all(r == final for r in rows[i:])), len(rows) - 1)
        parts.append(f"the {name} reads it from layer {first} of {len(rows) - 1}" if first < len(rows) - 1
                     else f"the {name} reads it only at the output")
    text = f"the model predicts {final!r} (p = {p:.2f}) after the prompt; " + "; ".join(parts) + "."
    why = (f"the model's own top-1 probability is {p:.2f}, near-uniform, so it cannot do this prompt "
           "(a random or tiny model?).") if p < 0.05 else None
    return answer_lines(text, why)


def plot(panels: list[tuple[str, list, np.ndarray]], inputs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_pos = panels[0][2].shape
    fig, axes = plt.subplots(1, len(panels), figsize=(1.1 * n_pos * len(panels) + 1.5, 0.28 * n_layers + 1.5),
                             squeeze=False)
    for ax, (name, words, probs) in zip(axes[0], panels):
        im = ax.imshow(probs, aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1)
        for i in range(n_layers):
            for j in range(n_pos):
                ax.text(j, i, repr(words[i][j])[1:-1][:8], ha="center", va="center", fontsize=6,
                        color="white" if probs[i, j] > 0.6 else "black")
        ax.set_xticks(range(n_pos), [repr(t)[1:-1][:8] for t in inputs], rotation=45, fontsize=7)
        ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers - 1)] + ["out"], fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("input token (the lens predicts the next)")
    axes[0][0].set_ylabel("layer (resid_pre)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6, label="top-1 probability")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tok = models.load(args.model)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer next to the model")
    ids = tok.encode(args.prompt, add_special_tokens=True)
    if len(ids) > model.config.max_seq_len:
        raise SystemExit(f"the prompt is {len(ids)} tokens, over the model's context {model.config.max_seq_len}")
    toks = jnp.asarray(ids, jnp.int32)
    keep = slice(max(0, len(ids) - args.positions), len(ids))
    inputs = [tok.decode([i]) for i in ids[keep]]
    name = "logit lens (frozen final-norm divisor)" if args.frozen_scale else "logit lens"
    lenses = {name: np.asarray(jax.jit(logit_lens, static_argnames="frozen_scale")(
        model, toks, frozen_scale=args.frozen_scale))[:, keep]}
    if args.tuned is not None:
        tuned, _ = load_tuned_lens(args.tuned, model)
        lenses["tuned lens"] = np.asarray(jax.jit(tuned_lens)(model, tuned, toks))[:, keep]
    panels = [(k, *top_tokens(v, tok)) for k, v in lenses.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    plot(panels, inputs, args.out / "lens_report.png")
    lines = [f"# Lens report: {args.model}", "", *answer(panels),
             f"Prompt: {args.prompt!r}; each cell: top-1 token, probability.", ""]
    for k, words, probs in panels:
        lines += table(k, words, probs, inputs)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    report = {"model": str(args.model), "prompt": args.prompt, "inputs": inputs,
              "lenses": {k: {"top1": w, "prob": p.tolist()} for k, w, p in panels}}
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
