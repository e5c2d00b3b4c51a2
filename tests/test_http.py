import asyncio
import math
import time

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sources import AuthError, RateLimited, SourceError, TransientError
from sources.http import AddressPolicy, BlockedAddress, Http, TooLarge, parse_retry_after


def app_with(routes):
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    return app


async def test_private_addresses_are_refused_unless_allowed(serve):
    async def ok(request):
        return web.Response(body=b"fine")
    base = await serve(app_with({"/x": ok}))
    async with Http(timeout=5) as http:
        with pytest.raises(BlockedAddress, match="private/loopback"):
            await http.get(f"{base}/x")
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as http:
        assert (await http.get(f"{base}/x")).body == b"fine"


async def test_host_names_resolving_to_private_addresses_are_refused(serve):
    async def ok(request):
        return web.Response(body=b"fine")
    port = (await serve(app_with({"/x": ok}))).rsplit(":", 1)[1]
    async with Http(timeout=5) as http:
        with pytest.raises(BlockedAddress, match="localhost is a private/loopback"):
            await http.get(f"http://localhost:{port}/x")
    async with Http(timeout=5, allow_private=["localhost"]) as http:
        assert (await http.get(f"http://localhost:{port}/x")).body == b"fine"


@pytest.mark.parametrize("ip, allowed", [("10.1.2.3", False), ("192.168.0.1", False), ("169.254.169.254", False),
                                          ("::1", False), ("fe80::1", False), ("8.8.8.8", True),
                                          ("::ffff:127.0.0.1", False)])
def test_address_policy(ip, allowed):
    assert AddressPolicy([]).ip_allowed(ip) is allowed
    assert AddressPolicy(["10.0.0.0/8"]).ip_allowed("10.9.9.9")


async def test_redirect_to_refused_address_is_blocked(serve):
    async def redirect(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
    base = await serve(app_with({"/r": redirect}))
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as http:
        with pytest.raises(BlockedAddress, match="169.254.169.254"):
            await http.get(f"{base}/r")


async def test_statuses_become_source_errors(serve):
    async def limited(request):
        return web.Response(status=429, headers={"Retry-After": "42"})
    async def down(request):
        return web.Response(status=503)
    async def denied(request):
        return web.Response(status=401)
    async def missing(request):
        return web.Response(status=404)
    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(body=b"late")
    base = await serve(app_with({"/429": limited, "/503": down, "/401": denied, "/404": missing, "/slow": slow}))
    async with Http(timeout=1, allow_private=["127.0.0.1"]) as http:
        with pytest.raises(RateLimited) as err:
            await http.get(f"{base}/429")
        assert err.value.retry_after == 42
        with pytest.raises(TransientError, match="server error 503"):
            await http.get(f"{base}/503")
        with pytest.raises(AuthError, match="401"):
            await http.get(f"{base}/401")
        with pytest.raises(SourceError, match="404"):
            await http.get(f"{base}/404")
        with pytest.raises(TransientError, match="timed out"):
            await http.get(f"{base}/slow")


async def test_size_cap_with_and_without_content_length(serve):
    async def big(request):
        return web.Response(body=b"x" * 5000)
    async def streamed(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"y" * 1000)
        return resp
    base = await serve(app_with({"/big": big, "/stream": streamed}))
    async with Http(timeout=5, max_bytes=2000, allow_private=["127.0.0.1"]) as http:
        with pytest.raises(TooLarge):
            await http.get(f"{base}/big")
        with pytest.raises(TooLarge):
            await http.get(f"{base}/stream")


async def test_api_keys_do_not_appear_in_error_messages(serve):
    async def down(request):
        return web.Response(status=500)
    base = await serve(app_with({"/posts.json": down}))
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as http:
        with pytest.raises(TransientError) as err:
            await http.get(f"{base}/posts.json", params={"api_key": "topsecretkey"})
    assert "topsecretkey" not in str(err.value)


def test_retry_after_parsing():
    assert parse_retry_after("7") == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert parse_retry_after("soon") is None


async def test_resolver_refuses_private_answers_at_connect_time():
    from sources.http import AddressPolicy, GuardedResolver
    resolver = GuardedResolver(AddressPolicy([]))
    with pytest.raises(OSError, match="refused address"):
        await resolver.resolve("localhost", 80)
    allowed = GuardedResolver(AddressPolicy(["localhost"]))
    assert await allowed.resolve("localhost", 80)
    await resolver.close()
    await allowed.close()


# ---- server-supplied delays are bounded (issue 12, item 2) ----------------------------------
HOSTILE_DELAYS = ["-5", "0", "-0", "nan", "NaN", "inf", "-inf", "Infinity", "1e20", "1e308", "1e400",
                  "31536000", "99999999999999999999999", "Thu, 01 Jan 2099 00:00:00 GMT",
                  "Mon, 01 Jan 99999 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 +9999", "2099-01-01T00:00:00Z",
                  "0001-01-01T00:00:00", "9999-12-31T23:59:59", "4070908800", "soon", "", "   ", "1_000",
                  "\x00", "0x10", "12abc", "-1e20"]


def _bounded(value):
    from sources.http import MAX_SERVER_DELAY
    return value is None or (isinstance(value, float) and math.isfinite(value) and 0 <= value <= MAX_SERVER_DELAY)


@pytest.mark.parametrize("value", HOSTILE_DELAYS)
def test_hostile_delays_parse_to_a_bounded_number_or_none(value):
    from sources.http import RESET_HEADERS, parse_reset, retry_after
    assert _bounded(parse_retry_after(value)), value
    assert _bounded(parse_reset(value)), value
    for name in ("Retry-After", *RESET_HEADERS):
        assert _bounded(retry_after(CIMultiDict({name: value}))), (name, value)


def test_delays_are_clamped_not_dropped():
    from sources.http import MAX_SERVER_DELAY, parse_reset
    assert parse_retry_after("-5") == 0 and parse_retry_after("0") == 0
    for huge in ("inf", "1e20", "31536000", "Thu, 01 Jan 2099 00:00:00 GMT"):
        assert parse_retry_after(huge) == MAX_SERVER_DELAY, huge
    for huge in ("inf", "1e20", "4070908800", "2099-01-01T00:00:00Z"):
        assert parse_reset(huge) == MAX_SERVER_DELAY, huge
    assert parse_retry_after("nan") is None and parse_reset("nan") is None
    assert parse_reset("-5") == 0
    assert 55 <= parse_reset(str(time.time() + 60)) <= 60     # epoch seconds
    assert parse_reset("42") == 42                             # seconds from now
    assert parse_retry_after(7) == 7                           # not text: read all the same


async def test_a_429_with_a_hostile_retry_after_is_a_rate_limit_with_a_bounded_delay(serve):
    values = ["-5", "0", "inf", "1e20", "nan", "Thu, 01 Jan 2099 00:00:00 GMT", "garbage"]

    async def limited(request):
        return web.Response(status=429, headers={"Retry-After": values[int(request.query["i"])]})

    async def down(request):
        return web.Response(status=503, headers={"Retry-After": values[int(request.query["i"])]})
    base = await serve(app_with({"/429": limited, "/503": down}))
    async with Http(timeout=5, allow_private=["127.0.0.1"]) as http:
        for i, value in enumerate(values):
            for path in ("/429", "/503"):
                with pytest.raises(TransientError) as err:
                    await http.get(f"{base}{path}", params={"i": str(i)})
                assert _bounded(getattr(err.value, "retry_after", None)), (path, value)


# ---- IPv4 addresses spelled as numbers (issue 12, item 5) ------------------------------------
LOOPBACK_SPELLINGS = ["2130706433", "0x7f000001", "0X7F000001", "0177.0.0.1", "127.1", "0x7f.1", "0177.1",
                      "127.0.1", "0x7f.0.0.0x1", "127.0.0.1."]
OTHER_LOOPBACK_SPELLINGS = ["2130706434", "0x7f000002", "0177.0.0.2", "127.2"]   # 127.0.0.2


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_numeric_ipv4_spellings_are_judged_as_the_address_they_mean(host):
    url = f"http://{host}:8080/x?y=1"
    with pytest.raises(BlockedAddress, match=r"^refused .*private/loopback.*\(127\.0\.0\.1\)"):
        AddressPolicy([]).check(url)
    assert AddressPolicy(["127.0.0.1"]).check(url) == "http://127.0.0.1:8080/x?y=1"
    assert AddressPolicy(["127.0.0.0/8"]).check(url) == "http://127.0.0.1:8080/x?y=1"
    # an allow-list entry may be spelled the same ways
    assert AddressPolicy([host]).check("http://127.0.0.1/") == "http://127.0.0.1/"
    assert AddressPolicy([host]).ip_allowed("127.0.0.1") and not AddressPolicy([host]).ip_allowed("127.0.0.2")


@pytest.mark.parametrize("host", ["08.0.0.1", "256.1.1.1", "1.2.3.4.5", "4294967296", "example.0x7f", "0x"])
def test_numeric_hosts_that_are_no_address_are_refused(host):
    with pytest.raises(BlockedAddress, match=r"^refused "):
        AddressPolicy(["0.0.0.0/0"]).check(f"http://{host}/")


UNICODE_LOOPBACK_SPELLINGS = ["\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127\u30020\u30020\u30021",
                              "127\uff0e0\uff0e0\uff0e1", "\uff10\uff58\uff17\uff46\uff10\uff10\uff10\uff10\uff10\uff11"]


@pytest.mark.parametrize("host", UNICODE_LOOPBACK_SPELLINGS)
def test_unicode_digits_and_dots_are_judged_as_the_address_the_client_connects_to(host):
    # full-width digits, ideographic and full-width full stops: IDNA folds them to 127.0.0.1
    with pytest.raises(BlockedAddress, match=r"^refused .*\(127\.0\.0\.1\)"):
        AddressPolicy([]).check(f"http://{host}:8080/x")
    assert AddressPolicy(["127.0.0.1"]).check(f"http://{host}:8080/x") == "http://127.0.0.1:8080/x"


def test_ipv6_with_an_ipv4_tail_is_judged_as_ipv6():
    assert AddressPolicy([]).check("http://[::ffff:8.8.8.8]/x") == "http://[::ffff:808:808]/x"
    with pytest.raises(BlockedAddress, match=r"^refused .*private/loopback"):
        AddressPolicy([]).check("http://[::ffff:127.0.0.1]/x")


async def test_a_unicode_spelling_of_a_refused_address_never_connects(serve):
    hits = []

    async def ok(request):
        hits.append(request.path)
        return web.Response(body=b"reached")
    base = await serve(app_with({"/x": ok}))
    port = base.rsplit(":", 1)[1]
    async with Http(timeout=5) as http:
        for host in UNICODE_LOOPBACK_SPELLINGS:
            with pytest.raises(BlockedAddress, match=r"^refused "):
                await http.get(f"http://{host}:{port}/x")
    assert hits == []


def test_numeric_spellings_of_public_addresses_are_fetched_in_dotted_form():
    assert AddressPolicy([]).check("http://134744072/x") == "http://8.8.8.8/x"   # judged only, never fetched
    assert AddressPolicy([]).check("https://user@0x8.0x8.0x8.0x8:443/") == "https://user@8.8.8.8/"   # the default port dropped
    assert AddressPolicy([]).check("https://example.org/a") == "https://example.org/a"


async def test_every_spelling_of_an_allowed_address_is_fetched_and_refused_ones_never_connect(serve):
    hits = []

    async def ok(request):
        hits.append(request.host)
        return web.Response(body=b"fine")

    async def redirect(request):
        raise web.HTTPFound(request.query["to"])
    base = await serve(app_with({"/x": ok, "/r": redirect}))
    port = base.rsplit(":", 1)[1]
    # a server on 127.0.0.2, which no policy here allows: it must never be reached
    other = web.Application()
    other_hits = []

    async def trap(request):
        other_hits.append(request.path)
        return web.Response(body=b"reached")
    other.router.add_get("/x", trap)
    from aiohttp.test_utils import TestServer
    trap_server = TestServer(other, host="127.0.0.2", port=int(port))
    try:
        await trap_server.start_server()
    except OSError:
        trap_server = None
    for allow in (["127.0.0.1"], ["2130706433"], ["0x7f.1"]):
        async with Http(timeout=5, allow_private=allow) as http:
            for host in LOOPBACK_SPELLINGS:
                assert (await http.get(f"http://{host}:{port}/x")).body == b"fine", (allow, host)
                to = f"http://{host}:{port}/x"
                assert (await http.get(f"{base}/r", params={"to": to})).body == b"fine", (allow, host)
            for host in OTHER_LOOPBACK_SPELLINGS:
                with pytest.raises(BlockedAddress, match=r"^refused .*\(127\.0\.0\.2\); add it to download"):
                    await http.get(f"http://{host}:{port}/x")
                with pytest.raises(BlockedAddress, match=r"^refused .*\(127\.0\.0\.2\); add it to download"):
                    await http.get(f"{base}/r", params={"to": f"http://{host}:{port}/x"})
    async with Http(timeout=5) as http:
        for host in LOOPBACK_SPELLINGS:
            with pytest.raises(BlockedAddress, match=r"^refused .*\(127\.0\.0\.1\); add it to download"):
                await http.get(f"http://{host}:{port}/x")
    assert other_hits == []
    assert len(hits) == 3 * 2 * len(LOOPBACK_SPELLINGS)
    if trap_server is not None:
        await trap_server.close()
