"""Test helper, run as a child process: tools/convert_hf.py that SIGKILLs itself once N tensors are
written (counted by the progress bar's updates), as a crash or an OOM kill would stop it.

    python tests/kill_during_convert.py N --load-dir IN --save-dir OUT ...
"""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from tqdm import tqdm  # noqa: E402

import convert_hf  # noqa: E402
from megatron_ssm.checkpoint import convert  # noqa: E402


def killed_after(n: int):
    class Bar(tqdm):
        done = 0

        def update(self, k=1):
            super().update(k)
            Bar.done += 1
            if Bar.done == n:
                os.kill(os.getpid(), signal.SIGKILL)

    return Bar


if __name__ == "__main__":
    convert.tqdm = killed_after(int(sys.argv[1]))
    convert_hf.main(sys.argv[2:])
    sys.exit("kill_during_convert.py: the conversion finished before it was killed")
