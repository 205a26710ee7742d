"""Stage 2: the brain-language model, trained on instruction conversations (the paper's §4).

Reads a stage-1 run (``config.stage1_workdir``: its extractor, dataset and preprocessing) and a
Llama-family LLM checkpoint (``config.llm.checkpoint``: a Hugging Face folder or hub name, or a
GGUF file). What trains is configuration:

- ``train.llm``: ``"frozen"`` (stage 2a: the projector alone), ``"full"`` or ``"lora"`` (stage 2b);
- ``train.extractor``: the stage-1 ViT3D trains too, or stays frozen.

The projector always trains. A batch (``nvl_jax.data.language_pipeline``) holds a trial's betas
and one tokenized conversation of its stimulus; the loss is the next-token cross-entropy on the
answer tokens.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nvl_jax.data import language_pipeline
from nvl_jax.evaluation import brain_captions
from nvl_jax.language import llm as llm_lib
from nvl_jax.models import brain_lm
from nvl_jax.training import experiment, loop, run_config
from nvl_jax.training import task as task_lib
from nvl_jax.training.checkpointing import Checkpointer
from nvl_jax.training.tasks import stage1

LLM_MODES = ("frozen", "full", "lora")


def ensure_stage1(config: ml_collections.ConfigDict) -> None:
    """Trains ``config.stage1_config`` into ``config.stage1_workdir`` unless a finished run is there.

    A run is finished once it has evaluated (``eval.json``); a killed one resumes.
    """
    workdir = Path(config.stage1_workdir)
    if (workdir / "eval.json").is_file():
        return
    if not config.stage1_config:
        raise FileNotFoundError(f"config.stage1_workdir = {str(workdir)!r}: no finished stage-1 run there (no "
                                "eval.json); train one first: python -m nvl_jax.train --config=configs/nsd.py "
                                f"--workdir={workdir}")
    stage1_config = importlib.import_module(f"nvl_jax.configs.{config.stage1_config}").get_config()
    print(f"{workdir}: no finished stage-1 run; training configs/{config.stage1_config}.py there first")
    loop.train(stage1_config, workdir)


def ensure_instructions(dataset, config: ml_collections.ConfigDict) -> None:
    """Builds the dataset's instruction data on first use when the config allows it (in-silico demos):
    process 0 writes it, every process waits for it."""
    if not dataset.has_instructions() and not config.data.build_instructions:
        raise FileNotFoundError(f"{dataset.root / 'instructions'}: no instruction data. Build it with: python -m "
                                f"nvl_jax.data.instructions --data {dataset.root} [--llava FILE]")

    def build_instructions():
        from nvl_jax.data import instructions

        instructions.write(dataset.root, seed=config.seed)

    experiment.on_first_process(build_instructions, done=dataset.has_instructions)


class Task(task_lib.Task):
    """Attributes: ``stage1`` (the stage-1 task of the extractor's run), ``dataset``, ``tokenizer``,
    ``model_config`` (a ``BrainLMConfig``), ``conversations`` (the tokenized training conversations)."""

    name = "stage 2"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        super().__init__(config, mesh)
        if config.train.llm not in LLM_MODES:
            raise ValueError(f"config.train.llm = {config.train.llm!r}: expected one of {LLM_MODES}")
        self.stage1_workdir = Path(config.stage1_workdir)
        ensure_stage1(config)
        self.stage1 = stage1.Task(run_config.load(self.stage1_workdir), mesh)
        self.dataset = self.stage1.dataset
        ensure_instructions(self.dataset, config)
        self.tokenizer = llm_lib.load_tokenizer(config.llm.checkpoint)
        lora = brain_lm.LoRAConfig(rank=config.lora.rank if config.train.llm == "lora" else 0,
                                   alpha=config.lora.alpha, targets=tuple(config.lora.targets))
        self.model_config = brain_lm.BrainLMConfig(extractor=self.stage1.model_config,
                                                   llm=llm_lib.load_config(config.llm.checkpoint), lora=lora)
        self.dtype = jnp.dtype(config.llm.dtype)
        self.conversations = language_pipeline.tokenize_instructions(
            self.dataset.instructions(), config.conversation.format, self.tokenizer,
            max_length=config.data.max_length, kinds=tuple(config.data.kinds))

    # ---- the model ---------------------------------------------------------------------------
    def build_model(self) -> brain_lm.BrainLanguageModel:
        return brain_lm.BrainLanguageModel(self.model_config, dtype=self.dtype, rngs=nnx.Rngs(self.config.seed))

    def trainable(self):
        parts = [nnx.PathContains("projector")]
        if self.config.train.llm == "full":
            parts.append(nnx.PathContains("llm"))
        elif self.config.train.llm == "lora":
            parts.append(brain_lm.lora.LoRAParam)
        if self.config.train.extractor:
            parts.append(nnx.PathContains("encoder"))
        return nnx.All(nnx.Param, nnx.Any(*parts))

    def _stage1_encoder(self):
        """The stage-1 run's ViT3D from its newest checkpoint (a strict restore onto its layout)."""
        layout, _, _ = loop.plan(self.stage1)
        checkpointer = Checkpointer(self.stage1_workdir)
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{checkpointer.directory}: config.stage1_workdir holds no checkpoint; train "
                                    f"stage 1 first: python -m nvl_jax.train --workdir={self.stage1_workdir}")
        params, _ = checkpointer.restore_params(step, layout)
        checkpointer.close()
        _, frozen = self.stage1.initial_state(layout)
        return layout.merge(params, frozen).vit

    def initial_state(self, layout):
        """The stage-1 extractor, the pretrained LLM (LoRA adapters added at zero) and a random projector."""
        llm = llm_lib.load(self.config.llm.checkpoint, dtype=self.dtype, mesh=self.mesh, rules=self.rules)
        model = brain_lm.BrainLanguageModel(self.model_config, dtype=self.dtype, rngs=nnx.Rngs(self.config.seed),
                                            encoder=self._stage1_encoder(), llm=llm)
        _, params, frozen = nnx.split(model, self.trainable(), ...)
        return jax.device_put(params, layout.param_shardings), jax.device_put(frozen, layout.frozen_shardings)

    # ---- the data ----------------------------------------------------------------------------
    def batch_ndims(self) -> dict[str, int]:
        return {"betas": 2, "subject": 1, "stimulus": 1, "input_ids": 2, "attention_mask": 2, "labels": 2}

    def train_iterator(self):
        c = self.config
        return iter(language_pipeline.train_dataset(self.dataset.root, self.dataset,
                                                    self.conversations, global_batch_size=c.data.batch_size,
                                                    seed=c.seed, worker_count=c.data.worker_count))

    def total_steps(self) -> int:
        c = self.config
        if c.total_steps > 0:
            return c.total_steps
        return max(1, round(c.epochs * language_pipeline.epoch_steps(self.dataset, self.conversations,
                                                                       c.data.batch_size)))

    def constants(self) -> stage1.Preprocessing:
        return self.stage1.prep

    def loss(self, model, batch, constants, dropout_key):
        output = model(constants.patches(batch), constants.active, batch["input_ids"], batch["attention_mask"],
                       batch["labels"], rngs=nnx.Rngs(dropout=dropout_key))
        loss, count = brain_lm.next_token_loss(output.logits, output.labels)
        return loss, {"loss": loss, "supervised_tokens": count.astype(jnp.float32)}

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, model, workdir: Path) -> dict:
        """Brief captions of every test stimulus from its brain tokens, against two baselines:
        ``workdir/eval_captions.json`` and ``workdir/captions_test_brief.jsonl``."""
        return brain_captions.evaluate(self, model, Path(workdir))

    def describe(self, results: dict) -> str:
        lines = []
        for mode, entries in results.items():
            parts = [f"{name} CIDEr {m['cider']:.3f} object F1 {m['object_f1']:.3f}" for name, m in entries.items()]
            lines.append(f"{mode}: " + "; ".join(parts))
        return "\n".join(lines)
