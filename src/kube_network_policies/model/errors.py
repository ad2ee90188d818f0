"""Validation errors that name the object, the field path and the problem."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str  # e.g. "spec.ingress[0].from[1].ipBlock.cidr"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationError(ValueError):
    """An object that cannot be enforced as written.

    `subject` names the object ("NetworkPolicy x/deny-all"), or where it came from when the
    object is too broken to have a name ("document 3 of policies.yaml").
    """

    def __init__(self, subject: str, errors: list[FieldError] | tuple[FieldError, ...]) -> None:
        self.subject = subject
        self.errors = tuple(errors)
        super().__init__(self.describe())

    def describe(self) -> str:
        if len(self.errors) == 1:
            return f"{self.subject}: {self.errors[0]}"
        lines = [f"{self.subject}: {len(self.errors)} problems"]
        lines.extend(f"  - {e}" for e in self.errors)
        return "\n".join(lines)

    def within(self, where: str) -> ValidationError:
        """The same errors, with the subject prefixed by a location such as a file name."""
        return ValidationError(f"{where}: {self.subject}", self.errors)
