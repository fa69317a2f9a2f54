"""`python -m aria_jax.cli ...` is `aria-jax ...`."""

import sys

from aria_jax.cli import main

sys.exit(main())
