"""Regenerate docs/schemas/*.schema.json from the msgspec Structs: `python docs/schemas/generate.py`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.mqtt.payloads import write_schemas

if __name__ == "__main__":
    for path in write_schemas(Path(__file__).resolve().parent):
        print(path.name)
