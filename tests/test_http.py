import asyncio

import pytest
from aiohttp import web

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
