"""``python counting_cli.py OUT.json sslhub-args…``: the sslhub CLI with every registered method's ``loss``
counted (the steps it was called for, per process, written to ``OUT.json.rank<R>``), so a test can tell a
run that resumed from one that silently started again.  ``SSLHUB_TEST_DIE_AT=K`` makes every process exit
at once (``os._exit``, no clean-up: a crash) when step K starts."""
import json
import os
import sys

import sslhub.distributed as D
from sslhub.apps.cli import main
from sslhub.methods.registry import list_methods

STEPS: list[int] = []


def counted(loss):
    def wrapper(self, batch):
        if batch.step == int(os.environ.get("SSLHUB_TEST_DIE_AT", -1)):
            os._exit(3)
        STEPS.append(batch.step)
        return loss(self, batch)

    return wrapper


if __name__ == "__main__":
    for cls in list_methods().values():
        cls.loss = counted(cls.loss)
    out, argv = sys.argv[1], sys.argv[2:]
    try:
        code = main(argv)
    finally:
        with open(f"{out}.rank{D.rank()}", "w") as f:
            json.dump(STEPS, f)
    sys.exit(code)
