"""A tiny HTTP CONNECT proxy for the tests (stdlib only), run as its own process on loopback.

Prints `listening <port>` first, then one line per CONNECT: `CONNECT <target> auth=<none|ok|wrong>` and
`tunnel <target>` once the tunnel is up. With `--auth user:password` it answers 407 to a request without
those basic-auth credentials, as corporate proxies do."""

import argparse
import asyncio
import base64
import sys


def log(line):
    print(line, flush=True)


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer, expected_auth):
    try:
        head = await client_reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        client_writer.close()
        return
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = (lines[0].split(" ") + ["", "", ""])[:3]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    given = headers.get("proxy-authorization")
    auth = "none" if given is None else ("ok" if given == expected_auth else "wrong")
    log(f"{method} {target} auth={auth}")
    if method != "CONNECT":
        client_writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        await client_writer.drain()
        client_writer.close()
        return
    if expected_auth is not None and given != expected_auth:
        client_writer.write(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
        )
        await client_writer.drain()
        client_writer.close()
        return
    host, _, port = target.rpartition(":")
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except (OSError, ValueError) as error:
        log(f"upstream {target} failed: {error}")
        client_writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        await client_writer.drain()
        client_writer.close()
        return
    client_writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    await client_writer.drain()
    log(f"tunnel {target}")
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--auth", help="user:password required as basic auth")
    args = parser.parse_args()
    expected = None
    if args.auth is not None:
        expected = "Basic " + base64.b64encode(args.auth.encode()).decode()
    server = await asyncio.start_server(lambda r, w: handle(r, w, expected), "127.0.0.1", args.port)
    log(f"listening {server.sockets[0].getsockname()[1]}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
