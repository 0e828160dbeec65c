"""User-facing exceptions. Every error neoxja raises on bad input is one of these, with a message that
names the problem and what to do about it; the CLI prints the message as one line."""


class NeoxjaError(Exception):
    """Base class of neoxja's own errors."""


class CheckpointError(NeoxjaError, OSError):
    """A checkpoint (directory, hub id or file) is missing, unreadable, corrupt or inconsistent."""


class ConfigError(NeoxjaError, ValueError):
    """A configuration value is invalid."""


class InputError(NeoxjaError, ValueError):
    """A call got arguments it cannot work with (ids out of range, too-long prompt, bad shapes...)."""
