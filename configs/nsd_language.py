"""Stage 2 on NSD: the brain-language model on a trained stage-1 run (the paper's §4).

    # stage 2a: the projector alone, Llama-3-8B-Instruct frozen
    python -m nvl_jax.train --config=configs/nsd_language.py:stage=2a --workdir=runs/nsd_2a
    # stage 2b: the LLM and the projector, fully or with LoRA
    python -m nvl_jax.train --config=configs/nsd_language.py:stage=2b,llm=lora --workdir=runs/nsd_2b

Variants: ``stage`` = 2a | 2b; ``llm`` = full | lora (2b only). The paper: lr 2e-5, batch 32 (2a) /
24 (2b), one epoch, 8 x A100. LLaVA's 2a uses lr 1e-3 for the projector; the paper states one lr.
"""

import ml_collections

from nvl_jax import sharding
from nvl_jax.configs import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg, stage="2a", llm="full")
    if variant.stage not in ("2a", "2b") or variant.llm not in ("full", "lora"):
        raise ValueError(f"configs/nsd_language.py: stage must be 2a or 2b and llm full or lora, got {variant}")
    config = ml_collections.ConfigDict()
    config.task = "stage2"
    config.seed = 0
    config.epochs = 1
    config.total_steps = -1
    config.log_every_steps = 10
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2

    config.stage1_workdir = "runs/nsd"  # a stage-1 run folder: extractor, dataset, preprocessing
    config.stage1_config = ""  # a config of nvl_jax.configs to train there first when it is empty ("" = never)

    config.llm = ml_collections.ConfigDict()
    config.llm.checkpoint = "meta-llama/Meta-Llama-3-8B-Instruct"  # a folder, hub name or .gguf file
    config.llm.dtype = "bfloat16"
    # What each decoder layer keeps for the backward pass: "none", "full" (recompute the layer) or a
    # jax.checkpoint_policies name (nvl_jax.models.layers.REMAT_POLICIES). Off by default: recomputing
    # costs about a third more compute per step, worth paying only where the step does not fit
    # otherwise; python -m nvl_jax.plan --from_config shows which (docs/sharding.md).
    config.llm.remat = "none"

    config.train = ml_collections.ConfigDict()
    config.train.llm = "frozen" if variant.stage == "2a" else variant.llm  # frozen | full | lora
    config.train.extractor = False  # the paper contradicts itself; frozen by default

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 64
    config.lora.alpha = 16.0
    config.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    config.conversation = ml_collections.ConfigDict()
    config.conversation.format = "llama3"  # paper | llama3 | vicuna_v1 | chat_template

    config.data = ml_collections.ConfigDict()
    config.data.kinds = ("brief", "detailed", "dialogue", "reasoning", "sd_prompt", "concept")
    config.data.max_length = 512  # text tokens, the <image> placeholder counting as one
    config.data.batch_size = 32 if variant.stage == "2a" else 24
    config.data.worker_count = 0
    config.data.build_instructions = False  # NSD: python -m nvl_jax.data.instructions --data ... first

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 2e-5
    config.optimizer.warmup_steps = 30  # LLaVA: 3 % warmup, cosine
    config.optimizer.final_lr_fraction = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 32
    config.eval.max_new_tokens = 48
    config.eval.limit = 0  # caption only the first N test records of each mode (0 = all)

    config.mesh_shape = (1, -1, 1)  # FSDP over every device
    config.sharding_rules = sharding.DEFAULT_RULES
    config.custom_backward = "auto"
    return config
