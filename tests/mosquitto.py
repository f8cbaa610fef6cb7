"""The Mosquitto fixture lives in agent.demo.mosquitto (the demo starts one too)."""

from agent.demo.mosquitto import MOSQUITTO, MosquittoBroker, Watcher, free_port

__all__ = ["MOSQUITTO", "MosquittoBroker", "Watcher", "free_port"]
