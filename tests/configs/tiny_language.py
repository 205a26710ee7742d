"""configs/nsd_language.py shrunk for tests: LoRA on a tiny Llama, on a tiny stage-1 run.

    --config=tests/configs/tiny_language.py:stage1=RUN,llm=FOLDER

``stage1``: a finished run of tests/configs/tiny.py (depth 2: brain tokens are the penultimate
layer's); ``llm``: a Llama as a Hugging Face folder with its tokenizer and chat template. Six
steps of 8 conversations, checkpoints at steps 3 and 6, one 8-record caption batch per test mode.
"""

from nvl_jax.configs import nsd_language, parse_arg


def get_config(arg: str | None = None):
    variant = parse_arg(arg, stage1="runs/tiny", llm="")
    if not variant.llm:
        raise ValueError("tests/configs/tiny_language.py: name the LLM, e.g. "
                         "--config=tests/configs/tiny_language.py:stage1=RUN,llm=FOLDER")
    config = nsd_language.get_config("stage=2b,llm=lora")
    config.stage1_workdir = variant.stage1
    config.llm.checkpoint = variant.llm
    config.llm.dtype = "float32"
    config.lora.rank = 4
    config.conversation.format = "chat_template"
    config.data.kinds = ("brief", "dialogue")
    config.data.max_length = 64
    config.data.batch_size = 8
    config.data.build_instructions = True
    config.total_steps = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 1
    config.eval.batch_size = 8
    config.eval.max_new_tokens = 4
    config.eval.limit = 8
    config.mesh_shape = (-1, 1, 1)
    return config
