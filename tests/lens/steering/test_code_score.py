"""The "is this code?" score of the main job (lens.steering.code_score.code_score) on
hand-written replies: real Python (fenced, bare, cut off by the token limit) scores 1;
prose, code-flavoured degenerate text and statements that do not compile score 0."""

import warnings

import pytest

from lens.steering.code_score import code_score

CODE = [
    "Here you go:\n```python\ndef reverse(s):\n    return s[::-1]\n```\nThis uses slicing.",
    "```\nimport sys\nprint(sys.argv)\n```",
    "You can write:\n\nprint(sorted([5, 2, 9, 1]))",
    # cut off by the token limit inside an unclosed fence: the complete lines are code
    "Use max in Python:\n\n```python\nnums = [5, 2]\nprint(max(nums))\ndef largest(nu",
    "for i in range(3):\n    print(i)",
]
NOT_CODE = [
    "The numbers are 1, 2, 5 and 9.",
    "1\n\n#\n\n#\n\n#",  # a number and comments parse, but are not code
    "The smallest = 5\n\nsorted_numbers = 1",  # assignments of constants only
    "return 10\n    return 1",  # parses, but compile rejects it
    "```javascript\nconsole.log(1 + 2);\n```",  # not Python
    "```python\ndef f(x:\n```",  # a closed fence that does not compile
    "",
]


@pytest.mark.parametrize("text", CODE)
def test_python_replies_score_one(text):
    assert code_score(text) == 1.0


@pytest.mark.parametrize("text", NOT_CODE)
def test_other_replies_score_zero(text):
    assert code_score(text) == 0.0


@pytest.mark.parametrize("action", ["always", "error"])
def test_reply_syntax_warnings_are_silenced(action):
    """`x is 1` makes compile emit a SyntaxWarning: the reply is still code (compile accepts
    it), nothing is warned, and a filter turning warnings into errors does not reject it."""
    text = "```python\nif x is 1:\n    print('one')\n```"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        assert code_score(text) == 1.0
    assert [w for w in caught if issubclass(w.category, SyntaxWarning)] == []
