"""fmh keys: make CURVE key pairs for dispatchers and workers on different hosts."""
from __future__ import annotations

HELP = "make CURVE keys so that a dispatcher and workers can talk across hosts"
DESCRIPTION = """Write ZeroMQ CURVE key pairs into DIR:
  DIR/server/server.key, server.key_secret     the dispatcher's pair (made once)
  DIR/clients/NAME.key, NAME.key_secret        one pair per client (worker, subscriber)

The dispatcher (serving.curve_keys=DIR) accepts only the client public keys in DIR/clients.
A worker host needs DIR/server/server.key and its own client pair:
  fmh serve --curve-keys DIR --connect tcp://HOST:PORT
Keep the *_secret files private."""


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the keys")
    p.add_argument("--client", default="client", metavar="NAME",
                   help="name of the client key pair to add (default: client)")


def run(args) -> int:
    import re

    from ..dispatch import make_keys
    from ..errors import ConfigError
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.client):
        raise ConfigError(f"--client {args.client!r}: use letters, digits, '_', '.', '-'")
    paths = make_keys(args.out, client=args.client)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    return 0
