"""Job: the frozen encoder's features of every prepared ECG, once, with Ray Data (ecgray features).

ray job submit --working-dir . -- python -m jobs.features --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.features", "jobs.features", __doc__.splitlines()[0]))
