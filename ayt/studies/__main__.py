"""`python -m ayt.studies <name> [overrides]`: run study <name> (conf/study/<name>.yaml), the
same as `python -m ayt.studies.<name>`; `python -m ayt.studies --help` lists the studies."""

import sys

from ayt.studies.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
