"""`mtllm ARGS` with the FP8 hardware check bypassed: torch's float8 matmul also runs on the CPU, which stands in
for an H100 in the 2-rank tests (tests/test_distributed.py)."""

import sys

import mtllm_train.model.fp8 as fp8
from mtllm_train.__main__ import main

fp8.check_fp8_support = lambda device: None
sys.exit(main())
