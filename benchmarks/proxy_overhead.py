"""Proxy overhead: the same requests sent straight to a vLLM-like fake model server and
through the proxy (no guard; and strict mode with a Llama Guard endpoint fake), on loopback.

Prints p50/p95 of the whole-response latency (non-streamed) and the time to the first content
byte (streamed). The fake model answers instantly, so the figures are the proxy's own cost.
Every server runs in this one Python process (threads sharing the GIL and two cores), which
inflates every row that involves more servers: read the rows as upper bounds.

    .venv/bin/python -m benchmarks.proxy_overhead [--requests 200]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx

from guardrail.config import config_from_mapping
from server.app import create_app
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app

REASONING = ("Let me think about this carefully. The user wants a short summary. "
             "I will list three points and keep it brief. ") * 4
ANSWER = "Here are three points: first, second, and third. That is all."


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(call: Callable[[], None], count: int) -> list[float]:
    for _ in range(5):  # warm-up
        call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def run(requests: int) -> None:
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "summarise"}]}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        upstream = stack.enter_context(serve_app(create_fake_openai_app(
            FakeReply(reasoning=REASONING, answer=ANSWER, chunk_chars=8))))
        guard = stack.enter_context(serve_app(FakeLlamaGuard().app()))
        targets = {"direct": upstream}
        for name, guard_section in (("proxy, guard none", {"kind": "none"}),
                                    ("proxy, strict + llama-guard fake",
                                     {"kind": "llama-guard", "url": f"{guard}/v1"})):
            config = config_from_mapping({
                "upstream": {"url": f"{upstream}/v1"}, "guard": guard_section,
                "store": {"url": f"sqlite:///{Path(tmp) / name.replace(' ', '_')}.db"},
            })
            targets[name] = stack.enter_context(serve_app(create_app(config)))
        client = stack.enter_context(httpx.Client(timeout=30))
        print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
              f"{requests} sequential requests per row; fake model answers instantly")
        print(f"{'target':34} {'full p50':>9} {'full p95':>9} {'ttfb p50':>9} {'ttfb p95':>9}  ms")
        for name, url in targets.items():
            def full(url: str = url) -> None:
                client.post(f"{url}/v1/chat/completions", json=payload).raise_for_status()

            def first_byte(url: str = url) -> None:
                with client.stream("POST", f"{url}/v1/chat/completions",
                                   json={**payload, "stream": True}) as response:
                    for chunk in response.iter_text():
                        if '"content":"' in chunk and '"content":""' not in chunk:
                            break
            full_ms = measure(full, requests)
            first_ms = measure(first_byte, requests)
            print(f"{name:34} {statistics.median(full_ms):9.2f} {percentile(full_ms, 0.95):9.2f} "
                  f"{statistics.median(first_ms):9.2f} {percentile(first_ms, 0.95):9.2f}")


def main() -> None:
    # The fake keeps writing after a first-byte probe leaves; asyncio logs each refused write.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    run(parser.parse_args().requests)


if __name__ == "__main__":
    main()
