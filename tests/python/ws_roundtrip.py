"""MQTT over WebSocket with paho-mqtt 1.x (the client browsers' libraries mirror):
subscribe on one WebSocket connection, publish on another, and print what arrived.

    python3 ws_roundtrip.py PORT [--tls CA_FILE] [--path /mqtt]
Exits 0 and prints "received <topic> <payload>" when the message came back.
"""
import argparse
import sys
import threading

import paho.mqtt.client as mqtt

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("--tls")
parser.add_argument("--path", default="/mqtt")
args = parser.parse_args()

got = threading.Event()
subscribed = threading.Event()


def client(name):
    c = mqtt.Client(client_id=name, transport="websockets", protocol=mqtt.MQTTv311)
    c.ws_set_options(path=args.path)
    if args.tls:
        c.tls_set(ca_certs=args.tls)
    return c


def on_message(_c, _u, msg):
    print(f"received {msg.topic} {msg.payload.decode()}", flush=True)
    got.set()


sub = client("ws-sub")
sub.on_message = on_message
sub.on_subscribe = lambda *_: subscribed.set()
sub.on_connect = lambda c, *_: c.subscribe("dashboard/#", qos=1)
sub.connect("127.0.0.1", args.port, keepalive=30)
sub.loop_start()
if not subscribed.wait(10):
    sys.exit("no SUBACK over WebSocket")

pub = client("ws-pub")
pub.connect("127.0.0.1", args.port, keepalive=30)
pub.loop_start()
pub.publish("dashboard/zone1/temp", "21.5", qos=1).wait_for_publish(10)
ok = got.wait(10)
pub.loop_stop()
sub.loop_stop()
sys.exit(0 if ok else "the message did not come back")
