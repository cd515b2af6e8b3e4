"""Job: align the fusion module on ECG-text pairs of the meta-train side before meta-training (ecgray align).

ray job submit --working-dir . -- python -m jobs.align --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.train.align", "jobs.align", __doc__.splitlines()[0]))
