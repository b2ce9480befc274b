"""`python -m rlora_cli` (and `accelerate launch -m rlora_cli train RECIPE`)."""

from rlora_cli.cli import main

main()
