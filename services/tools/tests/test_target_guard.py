import ipaddress

import pytest

from parley.tools.target_guard import GuardedResolver, TargetNotAllowed, address_allowed, check_url

from .conftest import OTHER_AGENT, OTHER_ORG, add_http_tool, request_tool, start_call


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
    "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
    "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::",
    "64:ff9b::a00:1", "2001:db8::1",
    "fec0::1",  # site-local (deprecated, still routed inside networks that use it)
    # IETF protocol assignments (192.0.0.0/24): not globally reachable, which the standard
    # library knew only of its /29 and .170/31 before Python 3.11.10 (CVE-2024-4032)
    "192.0.0.8", "192.0.0.192", "::ffff:192.0.0.192",
    # other IPv6 forms of a private or loopback IPv4 address: the local-use NAT64 prefix
    # (RFC 8215, embedded as RFC 6052 places it for a /96, /64, /56 or /48 prefix), the
    # IPv4-translated form (RFC 2765) and the deprecated IPv4-compatible one
    "64:ff9b:1::7f00:1", "64:ff9b:1:2:3:4:a00:1", "64:ff9b:1:0:a:0:100:0",
    "64:ff9b:1:c0:a8:101::", "64:ff9b:1:c0a8:1:100::", "::ffff:0:7f00:1", "::ffff:0:a00:1",
    "::7f00:1", "::a00:1", "::c0a8:101",
])
def test_refused_addresses(address):
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "192.0.0.9", "192.0.0.10", "192.0.1.1"])
def test_public_addresses(address):
    assert address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", [
    "169.254.169.254", "fd00:ec2::254", "fe80::1", "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe", "0.0.0.0", "::", "224.0.0.1",
    "100.100.100.200", "::ffff:100.100.100.200",  # Alibaba Cloud's (RAM role credentials)
    # The same behind a translator: the local-use NAT64 prefix (RFC 8215) with the address
    # where RFC 6052 puts it for a /96, /64, /56 or /48 prefix, the IPv4-translated form
    # (RFC 2765) and the deprecated IPv4-compatible one
    "64:ff9b:1::a9fe:a9fe", "64:ff9b:1::6464:64c8", "64:ff9b:1:ffff:0:ffff:a9fe:a9fe",
    "64:ff9b:1:0:a9:fea9:fe00:0", "64:ff9b:1:a9:fe:a9fe::", "64:ff9b:1:a9fe:a9:fe00::",
    "::ffff:0:a9fe:a9fe", "::ffff:0:6464:64c8", "::a9fe:a9fe", "::6464:64c8"])
def test_link_local_and_metadata_addresses_are_refused_even_when_private_is_allowed(address):
    # An org allowed its own private services must not reach the cloud's instance metadata
    # service, which hands out the platform's credentials.
    assert not address_allowed(ipaddress.ip_address(address), private_ok=True)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.1.1", "::1", "fc00::1",
                                     "93.184.216.34", "64:ff9b:1::a00:1", "::ffff:0:a00:1"])
def test_private_and_loopback_addresses_pass_when_private_is_allowed(address):
    assert address_allowed(ipaddress.ip_address(address), private_ok=True)


def test_ip_literal_urls_are_checked_before_any_request():
    with pytest.raises(TargetNotAllowed):
        check_url("http://127.0.0.1:8080/x")
    with pytest.raises(TargetNotAllowed):
        check_url("http://[::1]/x")
    check_url("https://93.184.216.34/x")
    check_url("https://example.com/x")  # names are the resolver's to check


@pytest.mark.parametrize("host", ["\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width digits
                                  "127\u30020\u30020\u30021",  # ideographic full stops
                                  "\u2460\u2461\u2466.0.0.1",  # circled digits
                                  "\uff11\uff16\uff19.254.169.254"])
def test_unicode_forms_of_an_ip_literal_are_checked_as_aiohttp_reads_them(host):
    # urlsplit leaves these as names (no resolver would see them); aiohttp's yarl connects to
    # the IP literal they normalise to.
    with pytest.raises(TargetNotAllowed, match="not a public address"):
        check_url(f"http://{host}:8080/x")


async def test_resolver_refuses_a_name_resolving_to_loopback():
    resolver = GuardedResolver()
    try:
        with pytest.raises(TargetNotAllowed, match="localhost resolves to"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


class _FixedResolver:
    """Answers like DNS would for a rebinding attacker's name: public first, then private."""

    def __init__(self, answers):
        self.answers = list(answers)

    async def resolve(self, host, port=0, family=0):
        address = self.answers.pop(0)
        return [{"hostname": host, "host": address, "port": port, "family": family,
                 "proto": 0, "flags": 0}]

    async def close(self):
        pass


async def test_each_resolution_is_checked_so_rebinding_is_refused():
    resolver = GuardedResolver(_FixedResolver(["93.184.216.34", "127.0.0.1"]))
    assert (await resolver.resolve("rebind.example", 80))[0]["host"] == "93.184.216.34"
    with pytest.raises(TargetNotAllowed):
        await resolver.resolve("rebind.example", 80)


async def test_loopback_target_refused_when_the_org_does_not_allow_private(
        bus, pool, service, target, events):
    await add_http_tool(pool, "by_ip", target.url("/ok"), org=OTHER_ORG, agent=OTHER_AGENT)
    await add_http_tool(pool, "by_name", f"http://localhost:{target.server.port}/ok",
                        org=OTHER_ORG, agent=OTHER_AGENT)
    await add_http_tool(pool, "by_full_width",  # "127.0.0.1" in full-width digits
                        f"http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{target.server.port}/ok",
                        org=OTHER_ORG, agent=OTHER_AGENT)
    await service()
    call_id = await start_call(bus, org=OTHER_ORG, agent=OTHER_AGENT)
    requests = [await request_tool(bus, call_id, name, org=OTHER_ORG)
                for name in ("by_ip", "by_name", "by_full_width")]

    for request in requests:
        failed = await events.outcome(request.tool_call_id)
        assert failed.type == "tool.failed", failed
        assert failed.error.startswith("target not allowed"), failed.error
        assert failed.retryable is False
    assert "/ok" not in target.hits


async def test_localhost_name_allowed_when_the_org_allows_private(bus, pool, service, target,
                                                                  events):
    await add_http_tool(pool, "by_name", f"http://localhost:{target.server.port}/ok")
    await service()
    call_id = await start_call(bus)
    request = await request_tool(bus, call_id, "by_name")
    assert (await events.outcome(request.tool_call_id)).type == "tool.completed"


async def test_a_name_resolving_to_metadata_is_refused_even_when_private_is_allowed():
    resolver = GuardedResolver(_FixedResolver(["10.0.0.5", "169.254.169.254"]), private_ok=True)
    assert (await resolver.resolve("internal.example", 80))[0]["host"] == "10.0.0.5"
    with pytest.raises(TargetNotAllowed, match="not a reachable address"):
        await resolver.resolve("metadata.example", 80)
    with pytest.raises(TargetNotAllowed):
        check_url("http://169.254.169.254/latest/meta-data/", private_ok=True)
    check_url("http://127.0.0.1:8080/x", private_ok=True)
