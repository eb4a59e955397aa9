"""`python -m ayt.studies.losses`: the search space is conf/study/losses.yaml (see studies/losses/).
LPIPS runs only where its VGG weights exist, as in loss_sweep."""

import sys

from ayt.studies.engine.cli import study_main
from ayt.studies.loss_sweep import skip_lpips_without_weights
from ayt.studies.engine.plan import study_hook

study_hook("losses")(skip_lpips_without_weights)

if __name__ == "__main__":
    sys.exit(study_main("losses"))
