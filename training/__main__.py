import sys

from training.train import cli

sys.exit(cli())
