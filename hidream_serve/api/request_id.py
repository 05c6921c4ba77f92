"""The request id a response and its log lines carry: the client's `x-request-id` when it is a short plain
token (Serve's proxy passes one it made itself when the client sends none), unique among recent requests."""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict

from .errors import BadRequest

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a UUID, a ULID, a trace id


class RequestIds:
    """One router replica's recent request ids. A client may reuse an id (a retry): the new request then gets
    the id with a suffix of its own, so that no two recent responses or log lines share one."""

    def __init__(self, remember: int = 4096):
        self.remember = remember
        self._recent: OrderedDict[str, None] = OrderedDict()

    def assign(self, header: str | None) -> str:
        """The id for a request whose `x-request-id` header is `header`; BadRequest naming the header if it is
        not a plain token."""
        if not header:  # none, or empty (as some proxies pass it)
            rid = uuid.uuid4().hex
        elif not REQUEST_ID_PATTERN.fullmatch(header):
            raise BadRequest(f"must be 1 to 128 letters, digits or . _ : - (got {len(header)} characters)",
                             field=REQUEST_ID_HEADER)  # fmt: skip
        else:
            rid = header if header not in self._recent else f"{header}.{uuid.uuid4().hex[:8]}"
        self._recent[rid] = None
        if len(self._recent) > self.remember:
            self._recent.popitem(last=False)
        return rid
