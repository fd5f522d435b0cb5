"""Print the live predictions of a running fmh dispatcher (its PUB endpoint).

    python examples/subscribe.py tcp://127.0.0.1:PORT
"""
import json
import sys

import zmq


def subscribe(endpoint, timeout_ms=None):
    """Yield each message the dispatcher publishes (a dict) until its end of stream."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")   # every kind: prediction, stats, eos
    sock.connect(endpoint)
    try:
        while sock.poll(timeout_ms):
            header = json.loads(sock.recv_multipart()[0])   # frame 0: the JSON header
            yield header
            if header["kind"] == "eos":
                return
    finally:
        sock.close()


if __name__ == "__main__":
    for msg in subscribe(sys.argv[1]):
        if msg["kind"] == "prediction":
            print(msg["cell"], msg["label"], msg["p_fetal"], msg["error"])
        elif msg["kind"] in ("stats", "eos"):
            print(msg["kind"], msg["counters"]["answered"], "answered")
