#!/usr/bin/env bash
# The in-silico localization figures: trains the three demo extractors (patch 14, 12, 10; the dataset
# is generated on first use) and evaluates their ensemble into runs/localization/localization_eval.json.
# Rerunning resumes or skips finished runs. STEPS overrides each run's length (default: the demo's 2000).
#
#   bash launch/localization_demo.sh            # or: STEPS=600 bash launch/localization_demo.sh
set -euo pipefail
steps=${STEPS:+--config.total_steps=$STEPS}
for patch in 14 12 10; do
  python -m nvl_jax.train --config=configs/demo.py:patch=$patch --workdir runs/demo-patch$patch $steps
done
python -m nvl_jax.evaluate_localization --workdir runs/demo-patch14,runs/demo-patch12,runs/demo-patch10 \
  --out runs/localization
python -m nvl_jax.localize --workdir runs/demo-patch14,runs/demo-patch12,runs/demo-patch10 --subject subj01 \
  --concept red --stimuli showing --out runs/localization/maps
