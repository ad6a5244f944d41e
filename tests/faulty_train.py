"""Test scaffolding: train.main with one fault injected, chosen by the FAULT environment variable.

- FAULT=fail-after-training: an exception after the last epoch, while the loaders' workers are alive.
- FAULT=hang-mid-save: at the third save that moves last.pt aside to last.prev.pt, stop right after that
  rename (last.pt is gone, its replacement not yet renamed in), print MID-SAVE and wait to be killed.
- FAULT=slow-steps: every optimizer step takes 3 s longer (a sleep where it reads its LR), so a test has
  time to act between two steps.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from classifier import files  # noqa: E402
from classifier.cli import parse_cli  # noqa: E402

if __name__ == "__main__":
    fault = os.environ["FAULT"]
    if fault == "fail-after-training":

        def calibrate_best(*args, **kw):
            raise RuntimeError("injected failure after the last epoch")

        train.calibration.calibrate_best = calibrate_best
    elif fault == "hang-mid-save":
        real_replace = os.replace
        moved_aside = []

        def replace(source, target):
            real_replace(source, target)
            if Path(target).name == "last.prev.pt":
                moved_aside.append(target)
                if len(moved_aside) == 3:
                    print("MID-SAVE", flush=True)
                    time.sleep(600)

        files.os.replace = replace
    elif fault == "slow-steps":
        real_lr_at = train.optim.lr_at

        def lr_at(step, **kw):
            time.sleep(3)
            return real_lr_at(step, **kw)

        train.optim.lr_at = lr_at
    else:
        raise SystemExit(f"unknown FAULT {fault!r}")
    train.main(parse_cli(sys.argv[1:]))
