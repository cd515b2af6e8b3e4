"""Job: pretrain the built-in ECG encoder (ecgray pretrain-encoder).

ray job submit --working-dir . -- python -m jobs.pretrain_encoder --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.train.pretrain_encoder", "jobs.pretrain_encoder", __doc__.splitlines()[0]))
