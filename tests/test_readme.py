"""The README's Python examples run as written (on the real default model)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    # The self-contained examples: quick start, generation, lens, geometry (the others
    # are fragments that name placeholder arrays).
    runnable = [b for b in blocks if "models.load(" in b or "generate(model" in b
                or "from lens import geometry" in b]
    assert len(runnable) >= 4, "README examples went missing"
    scope: dict = {}
    exec(compile("\n".join(runnable), str(README), "exec"), scope)
    # The numbers the README quotes:
    assert abs(float(scope["G"].orthogonal_pair_cosine_closed_form(1.0)) - 0.146) < 1e-3
    assert scope["res"].kl.shape == (16, 2, 2, 1)
    assert scope["many"].shape[0] == 16
    assert scope["cache"].resid_pre.shape[:1] == (30,)
