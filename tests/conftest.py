"""Test session set-up.

The kernels run under the Triton interpreter on this CPU-only CI: TRITON_INTERPRET must be set
before any kernel module is imported, because Triton decides at decoration time whether a
kernel is interpreted. A run on a GPU machine may set TRITON_INTERPRET=0 explicitly to test the
compiled kernels instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
