"""`python -m hw_fixtures` runs the modem emulator."""

from hw_fixtures.emulator import main

raise SystemExit(main())
