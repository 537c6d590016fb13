"""The fake ComfyUI as a process, for the supervision tests: ``python -m tests.connectors.comfyui.serve_fake
--port N [--node-delay S]``. It prints the CUDA_VISIBLE_DEVICES it was given (the supervisor pins
it to the slot's GPU) and serves until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from tests.fakes.comfyui import FakeComfyUI


async def serve(port: int, node_delay_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeComfyUI(port=port) as fake:
        fake.behaviour.node_delay_s = node_delay_s
        print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)
        print(f"fake ComfyUI listening on {fake.url}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node-delay", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.node_delay))


if __name__ == "__main__":
    main()
