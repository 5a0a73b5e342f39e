"""`python -m lpo`: the `lpo` command line (also what `accelerate launch -m lpo` and `torchrun -m lpo` start)."""

from lpo.cli import main

main()
