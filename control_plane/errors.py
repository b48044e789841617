"""Domain errors, each mapped once to an HTTP problem response."""

from __future__ import annotations


class ProblemError(Exception):
    status = 400
    title = "Bad Request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthenticationFailed(ProblemError):
    status = 401
    title = "Unauthorized"


class Forbidden(ProblemError):
    status = 403
    title = "Forbidden"


class NotFound(ProblemError):
    status = 404
    title = "Not Found"


class Conflict(ProblemError):
    status = 409
    title = "Conflict"


class BadRequest(ProblemError):
    status = 400
    title = "Bad Request"


class ServiceUnavailable(ProblemError):
    status = 503
    title = "Service Unavailable"
