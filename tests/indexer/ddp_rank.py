"""One rank of test_callback_ddp's two-process training, started by torchrun: `ddp_rank.py OUT`."""

import sys
from pathlib import Path

from service.demo.world import make_world
from tests.indexer.test_callback import make_trainer

if __name__ == "__main__":
    trainer, _ = make_trainer(Path(sys.argv[1]), make_world(seed=7, n_people=10, n_filler=20), ranks=2)
    trainer.train()
