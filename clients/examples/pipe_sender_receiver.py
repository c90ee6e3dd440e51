"""Sender/receiver over a named Pipe.

A sender process sends messages into a one-way pipe and closes its end; a
receiver process reads them in order until ``EOFError`` says the sender is
done, and checks it got exactly what was sent. Like
``multiprocessing.Pipe(duplex=False)``, ``m.Pipe(name, duplex=False)``
returns ``(reader, writer)``; each process picks the end it uses.

    export MANAGERD_AUTHKEY=...        # or MANAGERD_AUTHKEY_FILE=path
    python pipe_sender_receiver.py --address 127.0.0.1:50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import uuid

from managerd_client import connect

MESSAGES = [42, None, "hello", {"nested": [1, 2.5]}, b"bytes"]
TIMEOUT_S = 30.0


def sender(address: str, pipe_name: str) -> None:
    with connect(address) as m:  # the authkey comes from MANAGERD_AUTHKEY
        _, writer = m.Pipe(pipe_name, duplex=False)
        for message in MESSAGES:
            writer.send(message)
            print(f"sender: sent {message!r}", flush=True)
        writer.close()  # the receiver gets EOFError once it has read everything


def receiver(address: str, pipe_name: str) -> None:
    with connect(address) as m:
        reader, _ = m.Pipe(pipe_name, duplex=False)
        received = []
        while True:
            try:
                received.append(reader.recv(timeout=TIMEOUT_S))  # TimeoutError if none comes
            except EOFError:
                break
        print(f"receiver: got {received!r}", flush=True)
        if received != MESSAGES:
            sys.exit("receiver: that is not what was sent")  # exit code 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50000", help="HOST:PORT of managerd")
    address = parser.parse_args().address
    pipe_name = f"example-pipe-{uuid.uuid4().hex[:8]}"  # unique to this run

    with connect(address) as m:
        m.Pipe(pipe_name, duplex=False)  # create it before either side starts
        workers = [
            multiprocessing.Process(target=receiver, args=(address, pipe_name)),
            multiprocessing.Process(target=sender, args=(address, pipe_name)),
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT_S)
        m.delete(pipe_name)  # named objects live until deleted

    codes = [w.exitcode for w in workers]
    if codes != [0, 0]:
        print(f"FAILED: receiver and sender exit codes {codes}")
        return 1
    print(f"OK: {len(MESSAGES)} messages sent and received in order")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey, a timeout) exits 1 too
