"""Real servers on loopback ports that behave like the engines and stores the connectors talk to."""
