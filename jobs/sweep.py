"""Job: sweep meta-training hyperparameters with Ray Tune + ASHA (ecgray tune).

ray job submit --working-dir . -- python -m jobs.sweep --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.train.tune", "jobs.sweep", __doc__.splitlines()[0]))
