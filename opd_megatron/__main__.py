"""`python -m opd_megatron ...` (and `torchrun -m opd_megatron ...`). The guard matters: dist_checkpointing's
save spawns a helper process that re-imports the main module."""

import sys

from opd_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
