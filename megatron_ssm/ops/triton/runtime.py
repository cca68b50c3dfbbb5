"""Where the Triton kernels run, as their launchers need to know it."""
from __future__ import annotations

import os

# Triton's interpreter (TRITON_INTERPRET=1: the CPU tests' way into the kernels) runs a kernel in
# numpy on the host. It has no programmatic dependent launch, and Triton 3.6's multiplies 16-bit
# floats' bit patterns in tl.dot, so the launchers upcast those tiles to fp32 there (the same
# products: a bf16 x bf16 product is exact in fp32). Read once: Triton reads it at import too.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
