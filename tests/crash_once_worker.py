"""Test scaffolding: train.main, but the process dies (os._exit, like a crash or a kill -9) at step
DIE_AT_STEP, only on its first attempt (a marker file remembers). Used to test --resume auto under
torchrun --max-restarts."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from classifier.cli import parse_cli  # noqa: E402

if __name__ == "__main__":
    marker = Path(os.environ["CRASH_MARKER"])
    die_at = int(os.environ["DIE_AT_STEP"])
    real_lr_at = train.optim.lr_at

    def lr_at(step, **kw):
        if step == die_at and not marker.exists():
            marker.write_text("crashed once")
            os._exit(1)
        return real_lr_at(step, **kw)

    train.optim.lr_at = lr_at
    train.main(parse_cli(sys.argv[1:]))
