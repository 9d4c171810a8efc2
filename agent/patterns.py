"""Name patterns shared by the configuration, Applications and the command plane.

Kept apart from ``agent.config`` (pydantic-settings) so that validating a name on the
command line imports nothing heavy.
"""

from __future__ import annotations

SITE_PATTERN = r"^[a-z0-9-]{1,63}$"
"""A site: a NATS subject token and KV key part."""
NODE_PATTERN = r"^[a-z0-9_-]{1,63}$"
NAME_PATTERN = r"^[a-z0-9-]{1,63}$"
"""An application name."""
