"""Faults from outside: clients SIGKILLed mid-stream, the server killed or drained under load.

A killed client's connection drops without a goodbye: the server must notice, abort its request
and free its slot (and the queue entries of its waiting requests). A server restarted under load
must cost clients nothing worse than UNAVAILABLE: they retry and get correct answers from the new
process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from proto.gptoss.v1 import generate_pb2_grpc as pb_grpc
from runtime.types import GREEDY
from service.client import build_request
from tests.conftest import free_port, scrape, wait_for

ROOT = Path(__file__).resolve().parent.parent
# A streaming client in its own process: prints each message as it arrives, reads until killed.
CLIENT = """
import sys, grpc
from proto.gptoss.v1 import generate_pb2 as pb, generate_pb2_grpc as pb_grpc
req = pb.GenerateRequest(request_id=sys.argv[2], token_ids=pb.TokenIds(token_ids=[1, 2, 3]))
req.stopping.max_new_tokens, req.stopping.ignore_eos = 200, True
print("sent", flush=True)
for msg in pb_grpc.GenerationStub(grpc.insecure_channel(sys.argv[1])).StreamGenerate(req):
    print("token", flush=True)
"""
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 300)]


def idle(handle) -> bool:  # noqa: ANN001
    return (handle.scheduler.num_live == 0 and handle.state.engine_loop.num_in_flight == 0
            and handle.scheduler.slots.num_used == 0 and handle.scheduler.num_waiting == 0)


def test_sigkilled_clients_free_their_slots_and_queue_entries(
    make_server, slow_engine, engine_alone  # noqa: ANN001
) -> None:
    server = make_server(engine=slow_engine(0.01, max_slots=2))
    h = server.handle
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, server.target, f"victim-{i}"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
               for i in range(4)]  # 2 stream, 2 wait for a slot
    try:
        wait_for(lambda: h.scheduler.num_live == 4, 60, "all four requests to arrive")
        wait_for(lambda: h.scheduler.num_running == 2 and h.scheduler.num_waiting == 2, 60,
                 "two running, two waiting")
        running = {h.scheduler.slots.owner(s) for s in range(2)}
        for i, c in enumerate(clients):
            assert c.stdout.readline().strip() == "sent"
            if f"victim-{i}" in running:  # killed mid-stream, after tokens arrived
                assert c.stdout.readline().strip() == "token"
        for c in clients:
            c.send_signal(signal.SIGKILL)
        for c in clients:
            c.wait(30)
        wait_for(lambda: idle(h), 30, "the killed clients' slots and queue entries to be freed")
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
            c.stdout.close()
    m = scrape(server.metrics_port)
    assert m['gptoss_requests_total{finish_reason="aborted"}'] == 4
    assert m['gptoss_request_errors_total{code="CANCELLED"}'] == 4
    assert m["gptoss_slots_used"] == 0 and m["gptoss_num_requests_waiting"] == 0
    # the freed slots serve the next caller correctly
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(server.target))
    got = stub.Generate(build_request(token_ids=[9, 8, 7], max_new_tokens=6, temperature=0.0,
                                      ignore_eos=True), timeout=60)
    want = engine_alone.generate([9, 8, 7], GREEDY, max_new_tokens=6, ignore_eos=True)
    assert list(got.token_ids) == list(want.token_ids)


class RetryingClient(threading.Thread):
    """Sends requests in a loop; retries UNAVAILABLE; records every status and output."""

    def __init__(self, i: int, target: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.i, self.target, self.stop = i, target, stop
        self.prompt = [i + 1, 2, 3]
        self.codes: Counter[str] = Counter()
        self.outputs: list[tuple[list[int], bool]] = []  # (tokens, finished)
        self.ok_since_mark = 0

    def run(self) -> None:
        with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            stub = pb_grpc.GenerationStub(channel)
            deadline = time.monotonic() + 180  # bounded even if the test's stop never comes
            n = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                n += 1
                req = build_request(token_ids=self.prompt, max_new_tokens=8, temperature=0.0,
                                    ignore_eos=True)
                tokens: list[int] = []
                try:
                    if n % 2:
                        for msg in stub.StreamGenerate(req, timeout=30):
                            tokens.extend(msg.token_ids)
                    else:
                        tokens = list(stub.Generate(req, timeout=30).token_ids)
                except grpc.RpcError as exc:
                    self.codes[exc.code().name] += 1
                    self.outputs.append((tokens, False))
                    time.sleep(0.05)
                    continue
                self.codes["OK"] += 1
                self.outputs.append((tokens, True))
                self.ok_since_mark += 1

    def mark(self) -> None:
        self.ok_since_mark = 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_restart_under_load_costs_clients_only_retries(serve_process, engine_alone, how) -> None:  # noqa: ANN001
    port = free_port()
    args = ("--max-slots", "4", "--grace-period", "20")
    first = serve_process(*args, port=port)
    stop = threading.Event()
    clients = [RetryingClient(i, first.target, stop) for i in range(6)]
    try:
        for c in clients:
            c.start()
        wait_for(lambda: all(c.codes["OK"] >= 2 for c in clients), 60, "load on the first server")
        first.send_signal(getattr(signal, how))
        assert first.wait(60) == (0 if how == "SIGTERM" else -signal.SIGKILL)
        wait_for(lambda: sum(c.codes["UNAVAILABLE"] for c in clients) > 0, 30,
                 "clients to see the server gone")
        for c in clients:
            c.mark()
        second = serve_process(*args, port=port)
        wait_for(lambda: all(c.ok_since_mark >= 3 for c in clients), 90,
                 "every client to succeed against the restarted server")
    finally:
        stop.set()
        for c in clients:
            c.join(60)
    assert not any(c.is_alive() for c in clients)
    codes = sum((c.codes for c in clients), Counter())
    # UNAVAILABLE is what the draining server answers. Once in ~200 calls under CI load a client
    # saw CANCELLED at the restart — most likely a call that reached gRPC while the server was
    # shutting down, before any handler picked it up (gRPC cancels those itself; the service
    # never chooses CANCELLED). Allowed at most once per client; the outputs below must still
    # be right.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    assert codes["CANCELLED"] <= len(clients), codes
    for c in clients:
        want = list(engine_alone.generate(c.prompt, GREEDY, max_new_tokens=8,
                                          ignore_eos=True).token_ids)
        for tokens, finished in c.outputs:
            assert tokens == (want if finished else want[: len(tokens)]), (c.i, tokens, want)
    wait_for(lambda: scrape(second.metrics_port)["gptoss_slots_used"] == 0, 30, "idle")
