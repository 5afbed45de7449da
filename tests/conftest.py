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

# The tests run many tiny ops, where intra-op threads cost more than they give (and stall badly
# when the cores are busy): one thread.
torch.set_num_threads(1)
