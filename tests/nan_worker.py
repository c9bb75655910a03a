"""Run by tests/test_distributed.py under torchrun: ``sslhub`` with rotation's loss made non-finite on rank 1 only,
at step 2 (``python nan_worker.py nan|inf train …``)."""
import sys

import sslhub.distributed as D
from sslhub.apps.cli import main
from sslhub.methods.rotation import Rotation

real = Rotation.loss


def loss_poisoned_on_rank_1(self, batch):
    out = real(self, batch)
    if batch.step == 2 and D.rank() == 1:
        out["loss"] = out["loss"] * float(sys.argv[1])
    return out


if __name__ == "__main__":
    Rotation.loss = loss_poisoned_on_rank_1
    sys.exit(main(sys.argv[2:]))
