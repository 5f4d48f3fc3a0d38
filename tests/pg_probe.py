"""``python -m pg_probe train ...``: the ``diffalign`` command, then one line saying whether this process
still holds a ``torch.distributed`` process group (a finished run destroys it: ``Trainer.run``)."""

import sys

import torch.distributed as dist

from diffalign.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    print(f"process group left: {dist.is_available() and dist.is_initialized()}")
    sys.exit(code)
