"""`python -m ayt.studies.batch_robustness`: the search space is conf/study/batch_robustness.yaml (see studies/batch_robustness/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("batch_robustness"))
