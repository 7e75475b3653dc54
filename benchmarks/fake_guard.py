"""The fake Llama Guard endpoint (``tests/fakes/llama_guard_server.py``: vLLM's wire format) in
its own process, for the load benchmark's endpoint-guard row:

    python -m benchmarks.fake_guard --port 8200 --delay-ms 50

Every answer waits ``--delay-ms`` (the time a GPU-served guard takes) without holding the CPU,
so many checks can wait at once, as on a server that batches them. ``GET /v1/models`` answers
when it is ready.
"""

from __future__ import annotations

import argparse

from tests.fakes.llama_guard_server import FakeLlamaGuard


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    import uvicorn

    fake = FakeLlamaGuard(delay_s=args.delay_ms / 1000, rules={}, keep_requests=False)
    uvicorn.run(fake.app(), host=args.host, port=args.port, log_level="warning",
                access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
