"""The HTTP client all remote sources and the downloader share (aiohttp).

- per-host concurrency limits, a total timeout per request, a size cap on bodies;
- addresses in private, loopback, link-local and reserved ranges are refused unless allowed
  (``download.allow_private``), on the first request and on every redirect hop; an IPv4 address
  spelled as a number (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``) is read the way
  inet_aton and browsers read it, judged as that address and fetched in dotted form;
- status codes become the source errors the daemon understands: 429 -> RateLimited (honouring
  Retry-After), 5xx and timeouts -> TransientError, 401/403 -> AuthError;
- a server's delay (Retry-After, the rate-limit reset headers) is read as a finite number of
  seconds from 0 to ``MAX_SERVER_DELAY``, or None when it cannot be read; never an error.
"""
from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import math
import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
import aiohttp.abc
import yarl
from multidict import CIMultiDictProxy

from sources.base import AuthError, RateLimited, SourceError, TransientError

log = logging.getLogger(__name__)


class BlockedAddress(SourceError):
    """The URL points at an address that remote sources may not reach."""


class TooLarge(SourceError):
    pass


@dataclass
class DownloadConfig:
    """The ``[download]`` table: this client's limits and the daemon's download workers."""
    timeout: float = 30.0                 # seconds for one HTTP request
    max_bytes: int = 50 * 1024 * 1024     # larger downloads are refused
    max_pixels: int = 90_000_000          # decompression-bomb guard (width * height)
    per_host: int = 4                     # concurrent requests to one host
    workers: int = 4                      # concurrent downloads in the daemon
    queue_size: int = 64                  # download queue window (items waiting in memory)
    allow_private: list[str] = field(default_factory=list)  # IPs/CIDRs/hosts allowed although private
    near_duplicate_distance: int = 4      # perceptual-hash distance for near-duplicates; -1 = off
    user_agent: str = "tastefeed/0.1 (+https://github.com/tastefeed)"

    def check(self):
        """(key, problem) for the first bad value, or None."""
        for key in ("timeout", "max_bytes", "max_pixels", "per_host", "workers", "queue_size"):
            value = getattr(self, key)
            if value <= 0:
                return key, f"expected a positive number, got {value!r}"
        return None


@dataclass
class Response:
    url: str
    status: int
    headers: CIMultiDictProxy
    body: bytes

    def text(self) -> str:
        charset = "utf-8"
        ctype = self.headers.get("Content-Type", "")
        if "charset=" in ctype:
            charset = ctype.split("charset=")[-1].split(";")[0].strip() or "utf-8"
        return self.body.decode(charset, errors="replace")

    def json(self):
        import json
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise SourceError(f"malformed JSON from {short_url(self.url)}: {e}") from None


def short_url(url: str) -> str:
    """scheme://host/path, without the query string (which may hold API keys)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


MAX_SERVER_DELAY = 24 * 3600.0   # the longest wait a server can ask for here (the daemon caps it further)


def _delay(seconds: float) -> float | None:
    """``seconds`` clamped to 0..MAX_SERVER_DELAY; None for NaN."""
    if math.isnan(seconds):
        return None
    return min(MAX_SERVER_DELAY, max(0.0, seconds))


def parse_retry_after(value) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds or an HTTP date); None if unreadable."""
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    try:
        return _delay(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return _delay(when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, OSError, IndexError):
        return None


RESET_HEADERS = ("RateLimit-Reset", "X-RateLimit-Reset", "X-Rate-Limit-Reset")


def parse_reset(value) -> float | None:
    """Seconds until a rate-limit window resets: epoch seconds (X, Bluesky), an ISO time
    (Mastodon) or seconds from now (the IETF draft's ``RateLimit-Reset``); None if unreadable."""
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    try:
        n = float(value)
    except ValueError:
        from datetime import datetime
        try:
            return _delay(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError, OSError):
            return None
    return _delay(n - time.time() if n > 1e9 else n)


def retry_after(headers) -> float | None:
    """How long to wait, from Retry-After or else a rate-limit reset header (bounded as above)."""
    retry = parse_retry_after(headers.get("Retry-After"))
    if retry is None:
        for name in RESET_HEADERS:
            retry = parse_reset(headers.get(name))
            if retry is not None:
                break
    return retry


_NUMBER = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z", re.IGNORECASE)


def ipv4_literal(host: str) -> str | None:
    """The dotted address a host spelled as IPv4 numbers means, read as inet_aton and browsers
    read it (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1`` are all 127.0.0.1); None
    for a host name. A host whose last label is a number but that is no address (``256.1.1.1``,
    ``1.2.3.4.5``) raises ValueError: browsers refuse such URLs too."""
    if ":" in host:
        return None  # IPv6, perhaps with an IPv4 tail (::ffff:8.8.8.8): judged as IPv6
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not _NUMBER.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMBER.match(label) for label in labels):
        raise ValueError(f"{host} is not a valid IPv4 address")
    try:
        return socket.inet_ntoa(socket.inet_aton(name))
    except OSError:
        raise ValueError(f"{host} is not a valid IPv4 address") from None


class AddressPolicy:
    """Which IP addresses a remote source may reach."""

    def __init__(self, allow: list[str] | None = None):
        self.allowed_hosts: set[str] = set()
        self.allowed_nets: list[ipaddress._BaseNetwork] = []
        for entry in allow or []:
            net = self._network(entry)
            if net is not None:
                self.allowed_nets.append(net)
            else:
                self.allowed_hosts.add(entry.lower())

    @staticmethod
    def _network(entry: str) -> ipaddress._BaseNetwork | None:
        """An allow-list entry as a network: an address or CIDR, IPv4 ones in any spelling."""
        try:
            return ipaddress.ip_network(entry, strict=False)
        except ValueError:
            pass
        address, slash, prefix = entry.strip().partition("/")
        try:
            ip = ipv4_literal(address.lower())
            return ipaddress.ip_network(f"{ip}{slash}{prefix}", strict=False) if ip else None
        except ValueError:
            return None

    def ip_allowed(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        if getattr(addr, "ipv4_mapped", None):
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.allowed_nets):
            return True
        return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved
                    or addr.is_multicast or addr.is_unspecified)

    def check(self, url: str) -> str:
        """Refuse non-http(s) URLs and refused IP literals; return the URL to fetch (an IPv4
        address spelled as numbers rewritten in dotted form). Host names are judged by
        :class:`GuardedResolver` when the connection is made (one lookup, no rebinding window)."""
        try:  # the host as the client will connect to it: IDNA-encoded, Unicode digits and dots folded
            url = str(yarl.URL(url))
        except (TypeError, ValueError) as e:
            raise BlockedAddress(f"refused {short_url(url)}: not a valid URL ({e})") from None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise BlockedAddress(f"refused {short_url(url)}: only http and https URLs are fetched")
        host = (parts.hostname or "").lower()
        if not host:
            raise BlockedAddress(f"refused {url!r}: no host")
        try:
            ip = ipv4_literal(host)
        except ValueError as e:
            raise BlockedAddress(f"refused {short_url(url)}: {e}") from None
        fetch = url
        if ip is not None:
            userinfo, at, hostport = parts.netloc.rpartition("@")
            port = hostport.rpartition(":")[2] if ":" in hostport else ""
            fetch = parts._replace(netloc=f"{userinfo}{at}{ip}" + (f":{port}" if port else "")).geturl()
        else:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                return url
            ip = host
        if host not in self.allowed_hosts and not self.ip_allowed(ip):
            raise BlockedAddress(self.refusal(url, host, ip))
        return fetch

    @staticmethod
    def refusal(url: str, host: str, ip: str) -> str:
        return (f"refused {short_url(url)}: {host} is a private/loopback/link-local address ({ip}); "
                "add it to download.allow_private to allow it")


class RefusedAddress(OSError):
    """Raised by the resolver for a host name that resolves to a refused address."""

    def __init__(self, host: str, ip: str):
        super().__init__(f"{host} resolves to a refused address ({ip})")
        self.host, self.ip = host, ip


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """Re-checks the addresses a host name resolves to at connect time (no DNS rebinding)."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        if host.lower() not in self.policy.allowed_hosts:
            for info in infos:
                if not self.policy.ip_allowed(info["host"]):
                    raise RefusedAddress(host, info["host"])
        return infos

    async def close(self) -> None:
        await self._inner.close()


class Http:
    """One aiohttp session with the rules above. Use ``async with Http(...) as http``."""

    def __init__(self, *, timeout: float = 30.0, max_bytes: int = 50 * 1024 * 1024, per_host: int = 4,
                 allow_private: list[str] | None = None, user_agent: str = "tastefeed/0.1",
                 max_redirects: int = 5):
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.per_host = per_host
        self.policy = AddressPolicy(allow_private)
        self.user_agent = user_agent
        self.max_redirects = max_redirects
        self._session: aiohttp.ClientSession | None = None
        self._retired: set[aiohttp.ClientSession] = set()   # sessions of an older allow_private list
        self._retired_closing: set[asyncio.Task] = set()
        self._hosts: dict[str, asyncio.Semaphore] = {}

    @classmethod
    def from_config(cls, download) -> "Http":
        """From a ``DownloadConfig`` (the ``[download]`` table)."""
        return cls(timeout=download.timeout, max_bytes=download.max_bytes, per_host=download.per_host,
                   allow_private=download.allow_private, user_agent=download.user_agent)

    def set_allow_private(self, allow_private: list[str]) -> None:
        """Judge every later request by a new ``download.allow_private`` (a config reload). The
        next request opens a new session, so no kept-alive connection or cached DNS answer made
        under the old list is reused; the old session is closed once its requests are done."""
        self.policy = AddressPolicy(allow_private)
        old, self._session = self._session, None
        if old is not None and not old.closed:
            self._retired.add(old)
            asyncio.get_running_loop().call_later(self.timeout + 5, self._close_retired, old)

    def _close_retired(self, session: aiohttp.ClientSession) -> None:
        if session in self._retired:
            self._retired.discard(session)
            task = asyncio.ensure_future(session.close())
            self._retired_closing.add(task)
            task.add_done_callback(self._retired_closing.discard)

    async def __aenter__(self) -> "Http":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": self.user_agent},
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(10.0, self.timeout)),
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=self.per_host,
                                               resolver=GuardedResolver(self.policy)),
            )
        return self._session

    async def close(self) -> None:
        for old in list(self._retired):
            self._retired.discard(old)
            await old.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _host_limit(self, url: str) -> asyncio.Semaphore:
        host = urlsplit(url).netloc
        if host not in self._hosts:
            self._hosts[host] = asyncio.Semaphore(self.per_host)
        return self._hosts[host]

    async def get(self, url: str, *, params: dict | None = None, headers: dict | None = None,
                  max_bytes: int | None = None, auth: aiohttp.BasicAuth | None = None,
                  ok_statuses: tuple[int, ...] = (200,)) -> Response:
        """GET ``url`` following redirects (each hop checked); raise a SourceError on failure."""
        limit = max_bytes or self.max_bytes
        current = url
        for _hop in range(self.max_redirects + 1):
            current = self.policy.check(current)
            async with self._host_limit(current):
                try:
                    async with self.session.get(current, params=params, headers=headers, auth=auth,
                                                allow_redirects=False) as resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            current = urljoin(str(resp.url), resp.headers["Location"])
                            params = None  # the Location already carries its query
                            continue
                        self._raise_for_status(resp, current)
                        if resp.status not in ok_statuses:
                            return Response(str(resp.url), resp.status, resp.headers, b"")
                        body = await self._read_capped(resp, limit, current)
                        return Response(str(resp.url), resp.status, resp.headers, body)
                except asyncio.TimeoutError:
                    raise TransientError(f"timed out after {self.timeout:g}s: {short_url(current)}") from None
                except aiohttp.ClientConnectorError as e:
                    if isinstance(e.os_error, RefusedAddress):
                        raise BlockedAddress(AddressPolicy.refusal(current, e.os_error.host, e.os_error.ip)) from None
                    raise TransientError(f"cannot connect to {short_url(current)}: {e.os_error}") from None
                except aiohttp.ClientPayloadError as e:
                    raise TransientError(f"broken response from {short_url(current)}: {e}") from None
                except aiohttp.ClientError as e:
                    raise TransientError(f"HTTP error from {short_url(current)}: {type(e).__name__}: {e}") from None
        raise SourceError(f"too many redirects from {short_url(url)}")

    @staticmethod
    def _raise_for_status(resp: aiohttp.ClientResponse, url: str) -> None:
        status = resp.status
        if status == 429:
            retry = retry_after(resp.headers)
            raise RateLimited(f"rate limited (429) by {urlsplit(url).netloc}"
                              + (f", retry after {retry:.0f}s" if retry is not None else ""), retry)
        if status in (401, 403):
            raise AuthError(f"{status} {resp.reason} from {short_url(url)}: "
                            "check the credentials and that this account may read it")
        if status >= 500:
            retry = parse_retry_after(resp.headers.get("Retry-After"))
            err = TransientError(f"server error {status} from {short_url(url)}")
            if retry is not None:
                err = RateLimited(str(err), retry)
            raise err
        if status >= 400:
            raise SourceError(f"{status} {resp.reason} from {short_url(url)}")

    @staticmethod
    async def _read_capped(resp: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise TooLarge(f"{short_url(url)} is {int(length)} bytes, over the {limit}-byte limit")
        chunks, total = [], 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"{short_url(url)} is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)
