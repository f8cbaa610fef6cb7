"""`python -m agent` is `esim-agent`."""

import sys

from agent.cli import main

sys.exit(main())
