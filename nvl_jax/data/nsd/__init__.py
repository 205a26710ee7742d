"""Real Natural Scenes Dataset ingestion: ``python -m nvl_jax.data.prepare_nsd`` (docs/nsd.md).

layout: where NSD's files lie; design: trials and the train / test split from the design;
stimuli: images and COCO captions; sessions: one session's betas, checked and z-scored;
output: prepare.json, checksums.json and --verify; prepare: the whole run.
"""

from nvl_jax.data.nsd.layout import NSDError
from nvl_jax.data.nsd.output import verify
from nvl_jax.data.nsd.prepare import PrepareOptions, format_summary, prepare

__all__ = ["NSDError", "PrepareOptions", "format_summary", "prepare", "verify"]
