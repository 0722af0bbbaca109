"""The documented user-error types: input the user can fix, as opposed to a defect in fastcbd.

Every reader raises one of these for bad input, with a one-line message naming the file and the line (list
files) or the field / key path (JSON, .npz arrays, pickle keys, model-file fields, config keys):

    UserError(ValueError)       the base; `except fastcbd.errors.UserError` catches every kind below
      BadInputError             a data or model file, or one item of it (list file, COCO JSON, CIFAR batch,
                                .npz, image, model.pt)
      ConfigError               a config file or a key=value override

The `fastcbd` command prints a UserError (and FileNotFoundError) as one line `error: ...` and exits 2; any
other exception is a bug and keeps its traceback (exit 1).

A UserError raised in a DataLoader worker comes back to the main process as the same type (torch re-raises
a worker's exception by calling its type with one message); that message carries the worker's whole
traceback, so the constructor keeps only the original message.
"""
from __future__ import annotations


def _original_message(message: str, cls: type) -> str:
    """The original message of torch's "Caught X in DataLoader worker process N.\\nOriginal Traceback ..."."""
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return message
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    i = message.rfind(f"\n{name}: ")
    return message[i + len(name) + 3 :].rstrip("\n") if i >= 0 else message


class UserError(ValueError):
    """Bad user input (a data, model or config file, an override); the message names the file and the line,
    or the field / key."""

    def __init__(self, message="", *args):
        super().__init__(_original_message(message, type(self)) if isinstance(message, str) else message, *args)


class BadInputError(UserError):
    """A data or model file, or one item of it, that cannot be used; the message names the file and the line
    or field."""


class ConfigError(UserError):
    """A config file or override that cannot be applied; the message names the key (and the file)."""
