"""Validation errors that name the object, the field path and the problem.

Messages are bounded whatever the input: values are shown through `shown` (short, never the
repr of a whole container), and paths, subjects and messages are truncated when they are built,
so that a hostile file cannot turn one error line into megabytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kube_network_policies.errors import InputError

MAX_SHOWN = 80  # characters of a value quoted in a message
MAX_PATH = 1000  # a field path with a label key of the maximum length (317) fits
MAX_MESSAGE = 1000
MAX_ERRORS_SHOWN = 50  # per object; the count of the rest is given


def clip(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def shown(value: object, limit: int = MAX_SHOWN, *, quote: bool = True) -> str:
    """A short rendering of a value from an input for an error message.

    Strings are quoted (repr) and cut; containers are named by kind and size, never expanded
    (a YAML alias bomb is a small graph that repr would turn into gigabytes); huge integers are
    described by their number of digits.
    """
    if isinstance(value, str):
        cut = value[:limit]
        text = repr(cut) if quote else cut
        return text if len(value) <= limit else f"{text}...({len(value) - limit} more characters)"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 200:
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return f"an object of {len(value)} fields"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    return clip(type(value).__name__, limit)


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str  # e.g. "spec.ingress[0].from[1].ipBlock.cidr"
    message: str

    def __str__(self) -> str:
        path, message = clip(self.path, MAX_PATH), clip(self.message, MAX_MESSAGE)
        return f"{path}: {message}" if path else message


class ValidationError(InputError, ValueError):
    """An object that cannot be enforced as written.

    `subject` names the object ("NetworkPolicy x/deny-all"), or where it came from when the
    object is too broken to have a name ("document 3 of policies.yaml").
    """

    def __init__(self, subject: str, errors: list[FieldError] | tuple[FieldError, ...]) -> None:
        self.subject = subject
        self.errors = tuple(errors)
        super().__init__(self.describe())

    def describe(self) -> str:
        subject = self.subject  # built from clipped names (object_subject) and file locations
        if len(self.errors) == 1:
            return f"{subject}: {self.errors[0]}"
        lines = [f"{subject}: {len(self.errors)} problems"]
        lines.extend(f"  - {e}" for e in self.errors[:MAX_ERRORS_SHOWN])
        if len(self.errors) > MAX_ERRORS_SHOWN:
            lines.append(f"  - ... and {len(self.errors) - MAX_ERRORS_SHOWN} more")
        return "\n".join(lines)

    def within(self, where: str) -> ValidationError:
        """The same errors, with the subject prefixed by a location such as a file name."""
        return ValidationError(f"{where}: {self.subject}", self.errors)
