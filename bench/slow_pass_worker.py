"""``rbees-workerd`` whose model takes PASS_MS longer for every forward pass, busy in Python (holding
the GIL, as a GPU pass spends most of its time launching kernels): a GPU-like pass on a CPU, whose
cost hardly depends on how many rows it has. For the timing effects of expensive passes (when a
request arrives relative to the pass under way) where no GPU is at hand; the tokens are the model's.

    RBEES_BENCH_PASS_MS=30 python bench/slow_pass_worker.py --worker-id w --model PATH --port 8001 ...

``bench/orchestrator_overhead.py --emulate-pass-ms 30`` spawns its worker this way.
"""

from __future__ import annotations

import os
import time
from typing import Any

from transformers import PreTrainedModel

from rbees.worker.main import main

PASS_S = float(os.environ.get("RBEES_BENCH_PASS_MS", "30")) / 1000
_module_call = PreTrainedModel.__call__


def _slow_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = _module_call(self, *args, **kwargs)
    if type(self).__name__.endswith("ForCausalLM"):  # the whole model, not its inner base model
        end = time.perf_counter() + PASS_S
        while time.perf_counter() < end:
            pass
    return out


PreTrainedModel.__call__ = _slow_call

if __name__ == "__main__":
    main()
