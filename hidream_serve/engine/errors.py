"""One error hierarchy for the engine; the HTTP layer maps each class to a status code in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidInput(EngineError, ValueError):
    """A request field is wrong. `field` names it (with an index for list items, e.g. `refs[2]`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # survives pickling across Ray processes
        return (type(self), (self.field, self.message))


class CheckpointError(EngineError):
    """The checkpoint directory is missing files, or its weights do not fit the architecture."""


class Overloaded(EngineError):
    """The engine cannot take more work right now."""
