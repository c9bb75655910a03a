"""Run by tests/test_ddp.py under torchrun: ``sslhub`` (``python ddp_worker.py EVENTS_DIR train …``) with a record
of what each process's training did, written to ``EVENTS_DIR/rank{R}.json`` when it exits:

- ``events``: in order, ``["loss", step]`` for each micro-batch's forward through DDP, ``["reduce", numel]`` for each bucket
  DDP all-reduces (a comm hook counting, then doing DDP's own all-reduce) and ``["average", numel]`` for each
  hand-written flat all-reduce of the gradients (``sslhub.distributed.average_gradients``);
- ``wrappers``: every DDP built: class name, ``find_unused_parameters``, trainable parameter entries;
- ``buffers``: every buffer of the method at exit, as (sum, sum of squares): the same on every process when
  DDP's buffer sync is off and the methods keep their buffers equal themselves.
"""
import atexit
import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import sslhub.distributed as D
import sslhub.train.parallel as P
from sslhub.apps.cli import main

EVENTS: list = []
WRAPPERS: list = []
METHODS: list = []


class CountingDDP(P.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        WRAPPERS.append([type(self).__name__, kwargs.get("find_unused_parameters"),
                         sum(p.numel() for p in self.module.parameters() if p.requires_grad)])
        METHODS[:] = [self.module.method]

        def hook(state, bucket):
            EVENTS.append(["reduce", bucket.buffer().numel()])
            return default_hooks.allreduce_hook(None, bucket)

        self.register_comm_hook(None, hook)


real_average = D.average_gradients


def counting_average(params):
    EVENTS.append(["average", sum(p.grad.numel() for p in params if p.grad is not None)])
    real_average(params)


real_forward = P.LossModule.forward


def counting_forward(self, batch):
    EVENTS.append(["loss", batch.step])
    return real_forward(self, batch)


def write(events_dir: str) -> None:
    if D.is_dist():
        buffers = {k: [float(b.double().sum()), float(b.double().square().sum())]
                   for m in METHODS for k, b in m.named_buffers()}
        Path(events_dir, f"rank{D.rank()}.json").write_text(json.dumps({"events": EVENTS, "wrappers": WRAPPERS,
                                                                        "buffers": buffers}))


if __name__ == "__main__":
    P.DistributedDataParallel = CountingDDP
    D.average_gradients = counting_average
    P.LossModule.forward = counting_forward
    atexit.register(write, sys.argv[1])
    assert dist.is_available()
    sys.exit(main(sys.argv[2:]))
