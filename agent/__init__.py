"""The harmony-agent daemon: configuration, supervisor, control loop, CLI, health and commands."""

__version__ = "0.1.0"
