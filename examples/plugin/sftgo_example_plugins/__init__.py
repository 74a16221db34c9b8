"""Example sftgo plug-ins (entry points in pyproject.toml): the `toklen` strategy and the `focal` objective."""
