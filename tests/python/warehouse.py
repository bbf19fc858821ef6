"""The warehouse seed: sensors publish temperatures, an aggregator subscribes to
warehouse/#, a fan actuator with a persistent session gets the command sent while it
was away."""
import time

import paho.mqtt.client as mqtt

from common import HOST, PORT, Recorder, wait_for

aggregator = Recorder("aggregator", ["warehouse/#"], qos=0).start()

# The fan subscribes with a persistent session, then goes away.
fan = Recorder("fan-zone1", ["warehouse/zone1/fan/command"], clean_session=False, qos=1).start()
fan.stop()

sensors = []
for zone in (1, 2, 3):
    c = mqtt.Client(f"sensor-zone{zone}")
    c.connect(HOST, PORT, 60)
    c.loop_start()
    sensors.append(c)
for zone, c in enumerate(sensors, start=1):
    c.publish(f"warehouse/zone{zone}/temp", "25.5").wait_for_publish(5)

dash = mqtt.Client("dashboard")
dash.connect(HOST, PORT, 60)
dash.loop_start()
dash.publish("warehouse/zone1/fan/command", "ON", qos=1).wait_for_publish(5)

wait_for(lambda: aggregator.count() >= 4, "aggregator got the temperatures and the command")
topics = sorted(m[0] for m in aggregator.messages)
assert topics == ["warehouse/zone1/fan/command", "warehouse/zone1/temp",
                  "warehouse/zone2/temp", "warehouse/zone3/temp"], topics

# The fan comes back: session present, and the ON it missed is delivered.
fan2 = Recorder("fan-zone1", [], clean_session=False, qos=1).start()
assert fan2.flags["session present"] == 1, fan2.flags
wait_for(lambda: fan2.payloads("warehouse/zone1/fan/command") == [b"ON"], "queued ON for the fan")
fan2.stop()

for c in sensors + [dash]:
    c.disconnect()
    c.loop_stop()
aggregator.stop()
print("warehouse scenario ok")
