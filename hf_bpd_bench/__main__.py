"""`python -m hf_bpd_bench ...` is `hf-bpd ...`."""

import sys

from .cli import main

sys.exit(main())
