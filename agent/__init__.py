"""esim-agent: a connectivity agent for AT modems with eUICCs."""

__version__ = "0.1.0"
