pytest_plugins = ["connectors.testing"]
