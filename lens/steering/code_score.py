"""Metrics of generated text: `code_score` ("does this reply hold real Python?").

    from lens.steering.code_score import code_score
    code_score("```python\ndef f(x):\n    return x\n```")   # 1.0
"""

from __future__ import annotations

import ast
import re
import warnings

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(```|$)", re.S)
# Statements / expressions that make a parse "real code" rather than prose that happens to
# parse (a lone name, a number, `x = 3`).  A call with arguments (`print(x)`) also counts.
PYTHON_FENCES = ("", "python", "py", "python3")
CODE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom,
              ast.For, ast.While, ast.With, ast.If, ast.Lambda)


def code_score(text: str) -> float:
    """1.0 if the reply holds real Python, else 0.0.  Python = source that `compile` accepts
    (so `return` outside a function, bad indentation and prose are rejected) AND that holds
    a def / class / import / loop / with / if / lambda or a call with arguments.  Searched:
    fenced blocks (```python, ```py or bare ```), then every run of lines of the reply
    outside other languages' fences.  A reply cut off by the token limit counts if a prefix
    of its lines is such code (an unclosed fence whose first lines are complete, say)."""
    for lang, body, close in FENCE.findall(text):
        if lang.lower() in PYTHON_FENCES:
            if _real_code(body) or (not close and _some_prefix_is_code(body.rstrip().splitlines())):
                return 1.0
    other = FENCE.sub(lambda m: "" if m.group(1).lower() not in PYTHON_FENCES else m.group(0), text)
    lines = other.strip().splitlines()
    return float(any(_some_prefix_is_code(lines[i:]) for i in range(len(lines))))


def _some_prefix_is_code(lines: list[str]) -> bool:
    return any(_real_code("\n".join(lines[:end])) for end in range(len(lines), 0, -1))


def _real_code(src: str) -> bool:
    try:
        # A reply's own SyntaxWarnings (`x is 1`, "\d" in a string) say nothing about whether
        # it is code: silenced, so they neither spam the log nor turn into errors under -W error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(src)
            compile(tree, "<reply>", "exec")
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, CODE_NODES) or (isinstance(n, ast.Call) and (n.args or n.keywords))
               for n in ast.walk(tree))
