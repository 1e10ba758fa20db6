"""`python -m smile_fast ...` (what torchrun runs: `torchrun --nproc_per_node=N -m smile_fast train ...`)."""

from smile_fast.cli import console_main

console_main()
