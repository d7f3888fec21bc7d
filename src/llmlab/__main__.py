"""`python -m llmlab` runs the CLI."""

import sys

from llmlab.cli import main

sys.exit(main())
