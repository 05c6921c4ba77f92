"""Webhook delivery for jobs: a POST of a JSON payload, signed with HMAC-SHA256, retried with backoff.

Headers: `X-HiDream-Event` (the event kind), `X-HiDream-Timestamp` (unix seconds) and
`X-HiDream-Signature: sha256=<hex>`, the HMAC-SHA256 of `<timestamp>.<body>` with the configured secret, so a
receiver can check both the sender and the freshness (see docs/jobs.md). A 2xx answer ends the delivery;
anything else (or no answer) is retried after 1, 2, 4... seconds, up to the configured attempts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time

from . import metrics

log = logging.getLogger("ray.serve.hidream.jobs")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookSender:
    def __init__(self, secret: str, attempts: int = 5, backoff_s: float = 1.0, timeout_s: float = 10.0):
        self.secret, self.attempts, self.backoff_s, self.timeout_s = secret, attempts, backoff_s, timeout_s
        self.delivered = 0
        self.failed = 0

    async def send(self, url: str, event: str, payload: dict) -> bool:
        import httpx

        body = json.dumps(payload, separators=(",", ":")).encode()
        async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
            for attempt in range(self.attempts):
                ts = str(int(time.time()))
                headers = {"Content-Type": "application/json", "X-HiDream-Event": event, "X-HiDream-Timestamp": ts,
                           "X-HiDream-Signature": signature(self.secret, ts, body)}  # fmt: skip
                try:
                    r = await client.post(url, content=body, headers=headers)
                    if 200 <= r.status_code < 300:
                        self.delivered += 1
                        metrics.webhook("delivered")
                        return True
                    reason = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    reason = type(e).__name__
                log.info("webhook %s (%s) attempt %d failed: %s", url, event, attempt + 1, reason)
                if attempt + 1 < self.attempts:
                    await asyncio.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        metrics.webhook("failed")
        log.warning("webhook %s (%s) given up after %d attempts", url, event, self.attempts)
        return False
