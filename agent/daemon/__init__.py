"""esim-agent."""
