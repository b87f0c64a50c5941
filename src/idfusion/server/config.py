"""A server's settings, and the rule for binding beyond this machine."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IdfusionError

__all__ = ["ServerConfig", "BindError", "TOKEN_ENV", "is_loopback", "check_bind"]

logger = logging.getLogger(__name__)

#: the environment variable ``idfusion serve`` reads the access token from when ``--token`` is not given
TOKEN_ENV = "IDFUSION_TOKEN"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class BindError(IdfusionError, ValueError):
    """A bind address that would expose the server without the explicit opt-in."""


@dataclass
class ServerConfig:
    """How a server runs. Limits are per request; every one has a clear error (413, 422 or 429) when exceeded.

    Attributes:
        out_dir: the server's output folder; each job writes into its own ``<out_dir>/<job id>/``.
        token: the access token every request must carry (``None``: no token, only allowed on loopback).
        host: the bound address (loopback hosts also get a Host-header check against DNS rebinding).
        concurrency: jobs that run at the same time (each holds one loaded pipeline while it runs).
        max_queued: jobs waiting beyond the running ones; more are refused with 429.
        max_upload_bytes: the size of one uploaded file.
        max_pixels: the pixels of one uploaded image (checked from the header, before decoding).
        max_faces: face photos per job.
        max_jobs_kept: finished jobs remembered for status queries (their files stay on disk).
        cache_size: pipelines kept loaded (:class:`~idfusion.jobs.PipelineCache` ``max_items``).
    """

    out_dir: Path = field(default_factory=lambda: Path("outputs") / "serve")
    token: str | None = None
    host: str = "127.0.0.1"
    concurrency: int = 1
    max_queued: int = 32
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_faces: int = 4
    max_jobs_kept: int = 1000
    cache_size: int = 2

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("concurrency", "max_upload_bytes", "max_pixels", "max_faces", "max_jobs_kept", "cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be at least 0, got {self.max_queued}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: every face, a template and two option images, plus the form fields."""
        return self.max_upload_bytes * (self.max_faces + 3) + (1 << 20)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only accepts connections from this machine."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, allow_remote: bool, token: str | None) -> str | None:
    """The token a server bound to ``host`` must use.

    Loopback: ``token`` as given (``None`` allowed). Anything else needs ``allow_remote`` and then a token:
    ``token``, else ``$IDFUSION_TOKEN``, else a new random one (the caller prints it).

    Raises:
        BindError: a non-loopback host without ``allow_remote``.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if is_loopback(host):
        return token
    if not allow_remote:
        raise BindError(
            f"--host {host} accepts connections from other machines; add --allow-remote to do that on purpose "
            "(every request then needs the access token: --token or $IDFUSION_TOKEN, else one is generated)"
        )
    return token or secrets.token_urlsafe(24)
