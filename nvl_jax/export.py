"""Exports a stage-2 run's trained weights: ``python -m nvl_jax.export --workdir=RUN --out=DIR``.

Writes ``DIR/llm/`` (the LLM with its LoRA adapters merged, as a Hugging Face safetensors folder
that transformers' ``LlamaForCausalLM.from_pretrained`` reads, with the tokenizer beside it) and
``DIR/projector.safetensors`` (the projector on its own, keys ``linear_1.weight`` ... in
PyTorch's ``[out, in]`` layout, as LLaVA's ``mm_projector.bin`` holds them). LoRA runs never lose
their projector: it is saved with every checkpoint and exported here.
"""

from __future__ import annotations

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-2 (brain-language) run folder", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (default: RUN/export)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from nvl_jax.language import export

    export.export_run(_WORKDIR.value, _OUT.value)


if __name__ == "__main__":
    app.run(main)
