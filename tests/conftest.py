import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; the variable must be set before
# any kernel module is imported, because triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
