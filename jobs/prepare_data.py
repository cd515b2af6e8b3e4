"""Job: read WFDB records + ECG-QA once into Parquet shards with Ray Data (ecgray prepare).

ray job submit --working-dir . -- python -m jobs.prepare_data --help
"""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("ecgray.data.prepare", "jobs.prepare_data", __doc__.splitlines()[0]))
