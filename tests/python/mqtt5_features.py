"""The MQTT 5 seed: request/response properties, user properties, shared subscriptions
and retained messages cleared by an empty payload."""
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import HOST, PORT, Recorder, wait_for

V5 = mqtt.MQTTv5

# Request/response: properties travel end to end.
responder = Recorder("device-007", ["commands/device-007/#"], protocol=V5).start()
requester = mqtt.Client("client-001", protocol=V5)
requester.connect(HOST, PORT, 60)
requester.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.ResponseTopic = "replies/client-001"
props.CorrelationData = b"req-42"
props.UserProperty = [("trace", "abc"), ("trace", "def")]
props.ContentType = "application/json"
requester.publish("commands/device-007/reboot", "", properties=props).wait_for_publish(5)
wait_for(lambda: responder.count() == 1, "request at the responder")
got = responder.messages[0][4].properties
assert got.ResponseTopic == "replies/client-001", got
assert got.CorrelationData == b"req-42", got
assert got.UserProperty == [("trace", "abc"), ("trace", "def")], got
assert got.ContentType == "application/json", got

# Shared subscription: each message to exactly one of three workers.
# Each worker also has a topic of its own: a marker published there after the 30
# arrives after anything the 30 caused (one publisher, one connection per worker).
workers = [Recorder(f"worker-{i}", ["$share/workers/sensors/#", f"marker/worker-{i}"],
                    protocol=V5).start() for i in range(3)]


def sensor_payloads(w):
    with w.lock:
        return [m[1] for m in w.messages if m[0].startswith("sensors/")]


for i in range(30):
    requester.publish(f"sensors/s{i}", str(i), qos=1).wait_for_publish(5)
wait_for(lambda: sum(len(sensor_payloads(w)) for w in workers) == 30, "30 messages over the workers")
for i in range(3):
    requester.publish(f"marker/worker-{i}", "end", qos=1).wait_for_publish(5)
wait_for(lambda: all(w.payloads(f"marker/worker-{i}") == [b"end"] for i, w in enumerate(workers)),
         "the markers after the 30 at every worker")
all_payloads = sorted(int(p) for w in workers for p in sensor_payloads(w))
assert all_payloads == list(range(30)), all_payloads
assert all(sensor_payloads(w) for w in workers), [len(sensor_payloads(w)) for w in workers]

# Retained: set, seen by a new subscriber, cleared by an empty payload.
requester.publish("device/thermostat/setpoint", "21.5", qos=1, retain=True).wait_for_publish(5)
first = Recorder("thermo-1", ["device/thermostat/setpoint"], protocol=V5).start()
wait_for(lambda: first.payloads() == [b"21.5"], "retained setpoint")
requester.publish("device/thermostat/setpoint", "", qos=1, retain=True).wait_for_publish(5)
second = Recorder("thermo-2", ["device/thermostat/setpoint"], protocol=V5).start()
# A live (not retained) marker on the same topic comes after any retained message the
# subscription brought.
requester.publish("device/thermostat/setpoint", "marker", qos=1).wait_for_publish(5)
wait_for(lambda: b"marker" in second.payloads(), "the live marker at thermo-2")
assert second.payloads() == [b"marker"], second.payloads()

for r in [responder, first, second] + workers:
    r.stop()
requester.disconnect()
requester.loop_stop()
print("mqtt5 scenario ok")
