"""Our GGUF tokenizers encode, decode and template exactly as transformers' GGUF tokenizers.

The reference is `AutoTokenizer.from_pretrained(folder, gguf_file=...)` on the same
embedded file.  The strings cover unicode, code, whitespace runs, digits, special tokens
in the text, and the chat template's output.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # real tokenizers (GGUF and transformers) of both embedded models

from lens.models.io import embedded
from lens.models.io.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand \r\n CRLF",
    "x  1  23   456 7890 3.14159 -42 1e-5",
    "naïve café, Straße, ÅÄÖ, 日本語のテキスト, 한국어, Ελληνικά, עברית, العربية",
    "emoji 🤗🚀👩‍💻 and combining e\u0301 and zero\u200bwidth",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x != y: pass",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "<bos><eos><pad> <start_of_turn>model\n<end_of_turn>",
    "I'm sure they'll've done it; isn't it? DON'T SHOUT",
    "http://example.com/path?q=1&r=%20#frag",
    "",
    " ",
    "\n",
    "a" * 300,
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Unicode: 日本語 🤗"},
    ],
]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def pair(request):
    path = embedded.fetch(request.param)
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return request.param, ours, ref


def test_encode_matches_transformers(pair):
    name, ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (name, text)
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text), (name, text)


def test_decode_matches_transformers(pair):
    name, ours, ref = pair
    for text in TEXTS:
        ids = ref.encode(text, add_special_tokens=True)
        assert ours.decode(ids) == ref.decode(ids), (name, text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), (name, text)


def test_special_ids_match_transformers(pair):
    name, ours, ref = pair
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_ids == (ref.eos_token_id,)
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)


def test_chat_template_matches_transformers(pair):
    name, ours, ref = pair
    if ref.chat_template is None:
        assert ours.chat_template is None
        with pytest.raises(ValueError, match="no chat template"):
            ours.apply_chat_template(CHATS[0])
        return
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            ref_ids = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours.chat_tokens(chat, add_generation_prompt=gen) == list(ref_ids)


def test_from_folder_round_trip(pair, tmp_path):
    """An HF folder's tokenizer.json + tokenizer_config.json give the same tokenizer."""
    name, ours, ref = pair
    ref.save_pretrained(tmp_path)
    folder_tok = Tokenizer.from_folder(tmp_path)
    assert folder_tok is not None
    for text in TEXTS[:8]:
        assert folder_tok.encode(text) == ours.encode(text)
    assert folder_tok.bos_token_id == ours.bos_token_id and folder_tok.eos_token_ids == ours.eos_token_ids
    if ours.chat_template is not None:
        assert folder_tok.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])


def test_from_folder_without_tokenizer_is_none(tmp_path):
    assert Tokenizer.from_folder(tmp_path) is None
