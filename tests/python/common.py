"""Helpers for the seed-example scenarios: run paho-mqtt 1.x clients against a broker
given on the command line (MQTT port, then HTTP port of the admin API), wait for
conditions with a deadline, fail loudly."""
import json
import sys
import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 1883
HTTP_PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 8080


def api(path):
    """The JSON answer of the broker's admin API at /api/v1{path}, or None on 404."""
    url = f"http://{HOST}:{HTTP_PORT}/api/v1{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def wait_for(predicate, what, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Recorder:
    """A subscriber that records (topic, payload, qos, retain) of every message."""

    def __init__(self, client_id, topics, protocol=mqtt.MQTTv311, clean_session=True, qos=1):
        self.messages = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.flags = None
        kwargs = {"client_id": client_id, "protocol": protocol}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(**kwargs)
        self.topics = topics
        self.qos = qos
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        self.flags = flags
        if self.topics:
            client.subscribe([(t, self.qos) for t in self.topics])
        else:
            self.subscribed.set()
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.qos, msg.retain, msg))

    def start(self, **connect_kwargs):
        self.client.connect(HOST, PORT, 60, **connect_kwargs)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscription not acknowledged"
        return self

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    def payloads(self, topic=None):
        with self.lock:
            return [m[1] for m in self.messages if topic is None or m[0] == topic]

    def count(self):
        with self.lock:
            return len(self.messages)


def kill_socket(client):
    """End a client's connection without DISCONNECT, as a crash or network loss would."""
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        sock.close()
