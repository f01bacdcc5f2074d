"""Uploads the knowledge API cannot read: a 4xx problem, never a 500, nothing stored."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from parley.brain.api import create_app

from .test_api import keys, pool, problem, url

# the shared fixtures, made visible to pytest in this module
__all__ = ["keys", "pool"]

BOUNDARY = "xyzzy"
LIMIT = 4096


@pytest.fixture
async def client(pool: Any) -> Any:
    async with TestClient(TestServer(create_app(pool=pool, max_upload_bytes=LIMIT))) as c:
        yield c


async def stored(client: Any, keys: dict[str, str]) -> list[Any]:
    response = await client.get(url(), headers={"X-API-Key": keys["acme"]})
    assert response.status == 200
    return (await response.json())["documents"]


def part(filename: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: text/plain\r\n\r\n").encode() + data


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.mark.parametrize(("content_type", "data"), [
    ("multipart/form-data", part("a.txt", b"hello") + f"\r\n--{BOUNDARY}--\r\n".encode()),
    (MULTIPART, b"no boundary anywhere in here"),
    (MULTIPART, f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; ".encode()
     + b'filename="\xff.txt"\r\n\r\nhello\r\n' + f"--{BOUNDARY}--\r\n".encode()),
], ids=["no-boundary-given", "boundary-never-found", "filename-not-utf8"])
async def test_an_unreadable_multipart_body_is_a_400_problem(client: Any, keys: dict[str, str],
                                                            content_type: str, data: bytes,
                                                            ) -> None:
    response = await client.post(url(), data=data, headers={
        "X-API-Key": keys["acme"], "Content-Type": content_type})
    body = await problem(response, 400)
    assert body["detail"]
    assert await stored(client, keys) == []


async def test_a_multipart_body_over_the_cap_sent_in_chunks_is_a_413_problem(
        client: Any, keys: dict[str, str]) -> None:
    """Only the file part was capped: a chunked body's other parts were read to their end,
    however long, for the answer to be that there was no file."""
    async def chunks():
        yield f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n".encode()
        for _ in range(64):
            yield b"a" * 4096
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    response = await client.post(url(), data=chunks(), headers={
        "X-API-Key": keys["acme"], "Content-Type": MULTIPART})
    await problem(response, 413)
    assert await stored(client, keys) == []


def field(name: str, value: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode()
            + value + b"\r\n")


async def test_a_file_after_form_fields_is_uploaded(client: Any, keys: dict[str, str]) -> None:
    data = (field("title", b"Prices") + field("note", b"x" * 1000)
            + part("prices.txt", b"Cleaning costs $95.") + f"\r\n--{BOUNDARY}--\r\n".encode())
    response = await client.post(url(), data=data, headers={
        "X-API-Key": keys["acme"], "Content-Type": MULTIPART})
    assert response.status == 201, await response.text()
    assert [document["source"] for document in await stored(client, keys)] == ["prices.txt"]


async def test_a_file_after_too_many_form_fields_is_a_400_problem(client: Any,
                                                                  keys: dict[str, str]) -> None:
    data = (b"".join(field(f"f{index}", b"") for index in range(100))
            + part("prices.txt", b"Cleaning costs $95.") + f"\r\n--{BOUNDARY}--\r\n".encode())
    response = await client.post(url(), data=data, headers={
        "X-API-Key": keys["acme"], "Content-Type": MULTIPART})
    await problem(response, 400)
    assert await stored(client, keys) == []


async def test_an_upload_that_does_not_decompress_is_a_400_problem(client: Any,
                                                                   keys: dict[str, str]) -> None:
    response = await client.post(url(), params={"source": "a.txt"}, data=b"not gzip at all",
                                 headers={"X-API-Key": keys["acme"], "Content-Encoding": "gzip"})
    assert (await problem(response, 400))["type"].endswith("/unreadable-body")
    assert await stored(client, keys) == []



@pytest.mark.parametrize("agent_id", ["a%00b", "a" * 5000], ids=["nul", "long"])
async def test_an_agent_id_no_agent_can_have_is_a_404_problem(client: Any, keys: dict[str, str],
                                                              agent_id: str) -> None:
    response = await client.get(url(agent_id), headers={"X-API-Key": keys["acme"]})
    body = await problem(response, 404)
    assert body["type"].endswith("/agent-not-found") and len(body["detail"]) < 200
