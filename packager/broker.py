"""`edgepack broker`: the embedded MQTT 3.1.1 broker (amqtt) on loopback, for local trials.
For production use mosquitto or a managed broker."""
from __future__ import annotations

import asyncio
import logging
import signal


def config(host: str, port: int) -> dict:
    return {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}


def run(host: str = "127.0.0.1", port: int = 1883, *, ready=None) -> None:
    """Serve until SIGTERM/SIGINT."""
    from amqtt.broker import Broker

    logging.getLogger("amqtt").setLevel(logging.WARNING)

    async def main() -> None:
        broker = Broker(config(host, port))
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        if ready:
            ready()
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())
