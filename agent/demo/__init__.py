"""Demo helpers: the embedded MQTT broker used when Mosquitto is not installed."""
