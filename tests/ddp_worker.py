"""Run train.main under torchrun, then let every rank save its final weights for the test to compare.
This is test scaffolding: the trainer itself writes files on rank 0 only."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from classifier.cli import parse_cli  # noqa: E402

if __name__ == "__main__":
    out = Path(os.environ["DDP_TEST_OUT"])
    result = train.main(parse_cli(sys.argv[1:]))
    torch.save(result["model"].state_dict(), out / f"rank{os.environ['RANK']}.pt")
