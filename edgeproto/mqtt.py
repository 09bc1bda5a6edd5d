"""paho-mqtt 2.x wrapped once: keyword-only settings, TLS and credentials, a Last Will,
non-blocking start (connect_async + loop_start, so a broker that is down at start-up is
retried with back-off), and return codes turned into exceptions here only."""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Callable

from edgeproto.broker import BrokerConfig

log = logging.getLogger("edgepack.agent.mqtt")


class MqttError(Exception):
    pass


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class MqttClient:
    def __init__(self, cfg: BrokerConfig, *, client_id: str, will: Will | None = None,
                 on_connect: Callable[[], None] | None = None, on_message: Callable[[str, bytes], None] | None = None,
                 min_backoff: float = 1.0, max_backoff: float = 30.0, mqtt5: bool = False, loop=None):
        """`loop`: an edgeproto.netloop.NetLoop that drives this client (many clients, one thread);
        None: paho's own network thread."""
        import paho.mqtt.client as mqtt

        self.cfg = cfg
        self.connected = threading.Event()
        self._stopping = False
        self._subacks: dict[int, threading.Event] = {}
        self._on_connect_cb, self._on_message_cb = on_connect, on_message
        self.mqtt5 = mqtt5
        self._loop, self._backoff = loop, (min_backoff, max_backoff)
        if mqtt5:  # shared subscriptions ($share/...) for scaled-out fleet consumers
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:  # 3.1.1: mosquitto and the embedded amqtt broker both speak it
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                            protocol=mqtt.MQTTv311)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            c.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.max_inflight_messages_set(64)  # bundle chunks: keep the pipe full on big transfers
        c.reconnect_delay_set(min_delay=max(1, int(min_backoff)), max_delay=max(1, int(max_backoff)))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._client = c

    @property
    def paho(self):
        """The paho client underneath (a NetLoop drives it by this handle)."""
        return self._client

    def start(self) -> None:
        """Begin connecting in the background; never blocks on an unreachable broker."""
        extra = {"clean_start": True} if self.mqtt5 else {}
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, **extra)
        if self._loop is not None:
            self._loop.add(self._client, min_backoff=self._backoff[0], max_backoff=self._backoff[1])
        else:
            self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            self._loop.remove(self._client)
        else:
            self._client.disconnect()
            self._client.loop_stop()
        self.connected.clear()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False):
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (0,):  # MQTT_ERR_NO_CONN and friends: the caller keeps the message
            raise MqttError(f"publish to {topic} failed (rc={info.rc})")
        return info

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 10.0) -> bool:
        """Publish and wait for the broker's acknowledgement (PUBACK for QoS 1)."""
        try:
            info = self.publish(topic, payload, qos=qos, retain=retain)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (MqttError, RuntimeError, ValueError) as e:  # paho raises RuntimeError when the link drops
            log.debug("publish not acknowledged: %s", e)
            return False

    def subscribe(self, topic: str | list[str], qos: int = 1) -> None:
        """One topic filter, or several in one SUBSCRIBE packet."""
        if isinstance(topic, str):
            self._client.subscribe(topic, qos=qos)
        elif topic:
            self._client.subscribe([(t, qos) for t in topic])

    def subscribe_wait(self, topic: str, qos: int = 1, timeout: float = 10.0) -> bool:
        """Subscribe and wait for the broker's SUBACK (retained messages follow it at once)."""
        done = threading.Event()
        rc, mid = self._client.subscribe(topic, qos=qos)
        if rc != 0:
            return False
        self._subacks[mid] = done
        ok = done.wait(timeout)
        self._subacks.pop(mid, None)
        return ok

    def unsubscribe(self, topic: str | list[str]) -> None:
        """One topic filter, or several in one UNSUBSCRIBE packet."""
        if isinstance(topic, str) or topic:
            self._client.unsubscribe(topic)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        ev = self._subacks.get(mid)
        if ev is not None:
            ev.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%s", self.cfg.host, self.cfg.port)
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # paho leaves Nagle on: a small packet (SUBSCRIBE, PUBACK) sent behind another unacked
            # one then waits for the broker's delayed ACK, ~40 ms per exchange.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._loop is not None:
            self._loop.connected(client)
        self.connected.set()
        if self._on_connect_cb:
            self._on_connect_cb()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set() and not self._stopping:
            log.warning("disconnected from the broker (%s); reconnecting with back-off", reason_code)
        self.connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        if self._on_message_cb:
            try:
                self._on_message_cb(msg.topic, msg.payload)
            except Exception:  # a bad message must not kill paho's network thread
                log.exception("handling message on %s failed", msg.topic)
