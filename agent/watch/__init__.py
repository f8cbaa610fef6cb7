"""`esim-agent watch`: every agent on a broker, live or as one JSON snapshot."""
