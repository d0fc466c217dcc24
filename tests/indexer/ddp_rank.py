"""One rank of test_callback_ddp's two-process training, started by torchrun: `ddp_rank.py OUT`."""

import sys
from pathlib import Path

from tests.conftest import make_tiny_world
from tests.indexer.test_callback import make_trainer

if __name__ == "__main__":
    trainer, _ = make_trainer(Path(sys.argv[1]), make_tiny_world(), ranks=2)
    trainer.train()
