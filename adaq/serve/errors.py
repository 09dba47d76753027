"""HTTP errors with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

from starlette.responses import JSONResponse

from adaq.serve.protocol import ErrorDetail, ErrorResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    detail = ErrorDetail(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param,
                         code=code)
    return ErrorResponse(error=detail).model_dump()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def context_length_exceeded(message: str, param: str) -> APIError:
    return APIError(400, message, param, "context_length_exceeded")
