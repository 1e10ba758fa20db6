"""`python -m smile_fast ...` (what torchrun runs: `torchrun --nproc_per_node=N -m smile_fast train ...`)."""

import sys

from smile_fast.cli import main

sys.exit(main())
