"""The pre-travel check (`esim-agent check`): the traveller's checklist, item by item.

`report.py` holds the result shape, `evaluate.py` turns observations into items (pure),
`observe.py` gathers observations straight from the modems or from a running daemon, and
`system.py` checks what lies around the agent (clock, port owners, ModemManager, the broker).
"""
