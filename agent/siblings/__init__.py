"""Devices of a group acting as one system over MQTT: sibling view, claim protocol (docs/siblings.md)."""
