"""Run by tests/test_swav.py under torchrun: dist_worker's 2-process check for SwAV with the queue on.

Global batch 8, a queue of 2 batches that starts filling at epoch 1 (= step 1 here): it fills in steps
1–2 and takes part in the Sinkhorn codes of step 3; the prototypes are frozen in step 0 only.
"""
import sys
from unittest import mock

import dist_worker
import torch

import sslhub.distributed as D

NAME = "swav-queue"
ARGS = {"queue_length": 16, "epoch_queue_starts": 1, "n_local_views": 2, "n_prototypes": 64, "temperature": 0.5}
STEPS = 4


def queue_run(images: torch.Tensor, workdir: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """dist_worker.run for STEPS steps of SwAV with ARGS; also returns each step's ``queue_used``."""
    with mock.patch.dict(dist_worker.VARIANTS, {NAME: ("swav", ARGS)}), mock.patch.object(dist_worker, "STEPS", STEPS):
        method = dist_worker.build(NAME, workdir)
        used: list[float] = []
        loss = method.loss

        def recording_loss(batch):
            out = loss(batch)
            used.append(float(out["queue_used"]))
            return out

        method.loss = recording_loss
        return dist_worker.run(method, images), used


if __name__ == "__main__":
    out_dir = sys.argv[1]
    D.init_from_env()
    images = torch.load(f"{out_dir}/images.pt", weights_only=True)
    b = images.shape[0] // D.world_size()
    result, used = queue_run(images[D.rank() * b : (D.rank() + 1) * b], out_dir)
    result["queue_used"] = torch.tensor(used)
    torch.save(result, f"{out_dir}/rank{D.rank()}.pt")
