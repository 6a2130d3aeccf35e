"""The address policy (swarm/addresses.py): pure, no network."""

from __future__ import annotations

import pytest

from swarm.addresses import AddressPolicy, Reach, base_url, check_dialable, reach_of
from swarm.errors import AddressRefused, BadRequest


@pytest.mark.parametrize(
    ("own", "reach"),
    [
        ("http://127.0.0.1:8000", Reach.LOOPBACK),
        ("http://localhost:1", Reach.LOOPBACK),
        ("http://[::1]:1", Reach.LOOPBACK),
        ("http://10.213.0.1:1", Reach.PRIVATE),
        ("http://192.168.1.5:1", Reach.PRIVATE),
        ("http://100.64.3.4:1", Reach.PRIVATE),
        ("http://gpu-box.local:1", Reach.PRIVATE),
        ("http://8.8.8.8:1", Reach.PUBLIC),
        ("https://node.example.org:443", Reach.PUBLIC),
        ("http://[2001:4860::1]:1", Reach.PUBLIC),
    ],
)
def test_a_node_knows_where_it_lives_from_its_own_url(own: str, reach: Reach) -> None:
    assert reach_of(own) is reach


STRANGERS = {
    "loopback": ["http://127.0.0.1:22", "http://localhost:80", "http://127.1:80", "http://2130706433:80", "http://0x7f.0.0.1:80", "http://[::ffff:127.0.0.1]:80", "http://[::1]:80"],
    "private": ["http://10.0.0.1:80", "http://192.168.0.1:80", "http://[fd00::1]:80", "http://printer.local:631", "http://router:80"],
    "public": ["http://8.8.8.8:80", "https://node.example.org:443"],
    "never": ["http://169.254.169.254:80", "http://[fe80::1]:80", "http://0.0.0.0:80", "http://[::]:80", "http://224.0.0.251:5353", "http://240.0.0.1:80"],
}
ALLOWED = {Reach.LOOPBACK: {"loopback", "private", "public"}, Reach.PRIVATE: {"private", "public"}, Reach.PUBLIC: {"public"}}


@pytest.mark.parametrize("reach", list(Reach))
def test_what_a_node_dials_for_strangers_depends_on_its_reach(reach: Reach) -> None:
    policy = AddressPolicy(reach)
    for kind, urls in STRANGERS.items():
        for url in urls:
            assert policy.allows(url) == (kind in ALLOWED[reach]), (reach, url)


def test_operator_urls_are_always_dialled() -> None:
    policy = AddressPolicy.for_node("http://8.8.8.8:1", trusted=("http://127.0.0.1:9000/",))
    assert check_dialable("http://127.0.0.1:9000", policy) == "http://127.0.0.1:9000"
    with pytest.raises(AddressRefused, match="public address does not dial loopback"):
        check_dialable("http://127.0.0.1:9001", policy)


def test_a_tls_node_never_dials_plain_http_not_even_an_operator_url() -> None:
    policy = AddressPolicy.for_node("https://8.8.8.8:1", trusted=("http://9.9.9.9:9000",), plain_http=False)
    assert check_dialable("https://9.9.9.9:9001", policy) == "https://9.9.9.9:9001"
    for url in ("http://9.9.9.9:9000", "http://9.9.9.9:9001"):
        with pytest.raises(AddressRefused, match="plain http"):
            check_dialable(url, policy)
        assert not policy.allows(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5/admin/delete?confirm=1#",
        "http://127.0.0.1:5?x=1",
        "http://127.0.0.1:5#frag",
        "http://user:pw@8.8.8.8:80",
        "ftp://8.8.8.8:21",
        "http://8.8.8.8",  # no explicit port
        "http://8.8.8.8:0",
        "http://8.8.8.8:99999",
        "http://8.8.8.8:80 ",
        "http://ex\u00e4mple.org:80",
        "http://" + "a" * 300 + ".org:80",
    ],
)
def test_only_base_urls_are_dialled(url: str) -> None:
    with pytest.raises(AddressRefused) as caught:
        check_dialable(url, AddressPolicy(Reach.LOOPBACK))
    assert isinstance(caught.value, BadRequest) and caught.value.code == "address_refused"
    assert url not in str(caught.value)  # says the rule, never echoes the stranger's text


def test_base_urls_are_canonical() -> None:
    assert base_url("HTTP://Node.Example.org:80/") == "http://node.example.org:80"
    assert base_url("http://[::1]:8") == "http://[::1]:8"
    assert AddressPolicy(Reach.PRIVATE).describe() == {"reach": "private", "dials": ["private", "public"], "schemes": ["http", "https"]}
    assert AddressPolicy(Reach.PRIVATE, plain_http=False).describe()["schemes"] == ["https"]
