"""A small HTTP/1.1 server on trio + h11, shared by the worker and the registry."""

from dorafs.http.server import FileBody, HttpServer, Request, Response, json_response

__all__ = ["FileBody", "HttpServer", "Request", "Response", "json_response"]
