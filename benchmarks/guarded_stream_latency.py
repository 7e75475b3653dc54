"""The guarded stream hides the guard behind generation: with a guard of fixed latency L and a
trace of S steps, strict mode should add about L to the whole response, not S x L.

A vLLM-like fake streams S sentences at a fixed pace; a Llama Guard fake answers every check
after L seconds. For each L the script prints the total time of a streamed response through the
proxy with no guard and with the guard (strict), and the difference against L and S x L.

    .venv/bin/python -m benchmarks.guarded_stream_latency [--steps 12] [--latency 0.05 0.2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from guardrail.config import config_from_mapping
from server.app import create_app
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app

SENTENCE = ("This step works through one more part of the problem carefully, "
            "checking the arithmetic and the units before going on to the next part. ")


def timed_stream(client: httpx.Client, url: str) -> float:
    payload = {"model": "fake-model", "stream": True,
               "messages": [{"role": "user", "content": "solve it"}]}
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        for _ in response.iter_bytes():
            pass
    return time.perf_counter() - started


def run(steps: int, latencies: list[float], repeats: int, pace_s: float) -> None:
    reply = FakeReply(reasoning=SENTENCE * steps, answer="Done.", chunk_chars=16,
                      chunk_delay_s=pace_s)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        upstream = stack.enter_context(serve_app(create_fake_openai_app(reply)))
        client = stack.enter_context(httpx.Client(timeout=120))
        print("## guarded_stream_latency.py: a guard of latency L adds about L, not S x L\n")
        print(f"`python -m benchmarks.guarded_stream_latency`: a streamed response of {steps} "
              f"reasoning steps (~{len(SENTENCE)} characters each, 16-character chunks every "
              f"{pace_s * 1000:.0f} ms) through the proxy with no guard and in strict mode with "
              "a Llama Guard fake that answers every check after L seconds; median of "
              f"{repeats} responses; seconds.\n")
        print("| guard latency L | no guard | strict + guard | added | S x L |")
        print("|---|---|---|---|---|")
        for latency in latencies:
            fake_guard = FakeLlamaGuard(delay_s=latency, rules={})
            guard_url = stack.enter_context(serve_app(fake_guard.app()))
            rows = {}
            for name, guard in (("none", {"kind": "none"}),
                                ("llama-guard", {"kind": "llama-guard", "url": f"{guard_url}/v1",
                                                 "compliance_cues": False})):
                config = config_from_mapping({
                    "upstream": {"url": f"{upstream}/v1"}, "guard": guard,
                    "stream": {"min_step_chars": 24},
                    "store": {"url": f"sqlite:///{Path(tmp) / f'{name}-{latency}.db'}"},
                })
                proxy = stack.enter_context(serve_app(create_app(config)))
                timed_stream(client, proxy)  # warm-up
                rows[name] = statistics.median(timed_stream(client, proxy)
                                               for _ in range(repeats))
            added = rows["llama-guard"] - rows["none"]
            print(f"| {latency:.3f} | {rows['none']:.3f} | {rows['llama-guard']:.3f} "
                  f"| {added:.3f} | {steps * latency:.3f} |")
        print("\nChecks run while the model generates, so a response pays about one guard "
              "latency (the last step's), not one per step.")


def main() -> None:
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between chunks")
    args = parser.parse_args()
    run(args.steps, args.latency, args.repeats, args.pace)


if __name__ == "__main__":
    main()
