"""The CPU suite: Triton kernels run under the interpreter, and nothing is fetched from a hub.

Both variables must be set before triton or transformers are imported, so they are set here,
at the top of the first file pytest loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
