"""The tokenizer of a Llama checkpoint: a Hugging Face folder's tokenizer files or a GGUF's metadata.

A GGUF carries its tokenizer as metadata (``tokenizer.ggml.tokens``, ``merges``,
``token_type``, special-token ids, ``tokenizer.chat_template``). transformers'
GGUF converter turns that into a ``tokenizers`` backend; the metadata is read
here with the ``gguf`` package, because transformers' own GGUF reader imports
torch, which nvl_jax does not need at run time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nvl_jax.models import gguf_io, hf_loader

if TYPE_CHECKING:  # transformers is imported on first use: importing nvl_jax.models.llama stays light
    import transformers

_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def load_tokenizer(path_or_name: str | os.PathLike, *, gguf_file: str | None = None,
                   subfolder: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer, with its chat template, of the checkpoint ``LlamaForCausalLM.from_pretrained`` loads
    from the same arguments: a Hugging Face folder's tokenizer files, or a GGUF's metadata."""
    import transformers

    gguf_path = gguf_io.locate(path_or_name, gguf_file, subfolder)
    if gguf_path is None:
        return transformers.AutoTokenizer.from_pretrained(hf_loader.resolve(path_or_name, subfolder))
    return tokenizer_from_gguf(gguf_io.GGUFFile(gguf_path))


def tokenizer_from_gguf(file: gguf_io.GGUFFile) -> transformers.PreTrainedTokenizerFast:
    """Builds the tokenizer a GGUF's metadata describes, as transformers' ``from_pretrained(gguf_file=)`` does."""
    import transformers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    def group(name: str) -> dict:
        return {field: file.value(f"tokenizer.{key}") for key, field in GGUF_TOKENIZER_MAPPING[name].items()
                if f"tokenizer.{key}" in file}

    vocabulary, settings = group("tokenizer"), group("tokenizer_config")
    if "tokens" not in vocabulary:
        raise gguf_io.GGUFError(f"{file.path}: metadata field 'tokenizer.ggml.tokens' is missing; "
                                "the file carries no tokenizer")
    if vocabulary.get("tokenizer_type") == "llama":
        # A sentencepiece vocabulary adds BOS unless the file says otherwise (llama.cpp's rule).
        settings.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = file.value(f"tokenizer.ggml.{key}", None)
        settings[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(file.value("general.architecture"), vocabulary)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **extra)
