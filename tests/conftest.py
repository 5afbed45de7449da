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

# Small launch sizes (documented in moe_restore.kernels.settings, read at every call), so that the tests' short inputs
# cross several chunks and carry blocks of the scan and several row splits of the expert-MLP
# weight-gradient reductions, on every device.
os.environ.setdefault("MOE_RESTORE_SCAN_CHUNK", "16")
os.environ.setdefault("MOE_RESTORE_SCAN_CARRY_BLOCK", "8")
os.environ.setdefault("MOE_RESTORE_ROW_SPLITS", "2")

# The tests run many tiny ops, where intra-op threads cost more than they give (and stall badly
# when the cores are busy): one thread.
torch.set_num_threads(1)
