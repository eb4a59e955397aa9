"""`python -m ayt.studies.finetune`: the search space is conf/study/finetune.yaml (see studies/finetune/)."""

import sys

from ayt.studies.engine.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main("finetune"))
