"""The robot-fleet seed: per-robot status with LWT + retained presence, wildcard
telemetry for the dashboard, QoS 2 commands to a robot, exactly once."""
import json
import time

import paho.mqtt.client as mqtt

from common import HOST, PORT, Recorder, api, kill_socket, wait_for


class RobotMQTTClient:
    """As the seed wrote it (username and password set, LWT offline, retained status)."""

    def __init__(self, robot_id: str, broker: str, port: int = 1883):
        self.robot_id = robot_id
        self.commands = []
        self.client = mqtt.Client(client_id=f"robot-{robot_id}")
        self.client.username_pw_set("robot_user", "secure_password")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: setattr(self, "ready", True)
        self.ready = False
        self.client.will_set(
            f"fleet/1/robot/{robot_id}/status",
            payload=json.dumps({"status": "offline"}),
            qos=1, retain=True,
        )
        self.client.connect(broker, port)

    def _on_connect(self, client, userdata, flags, rc):
        client.subscribe(f"fleet/1/robot/{self.robot_id}/command/#", qos=2)
        self.publish_status("online")

    def _on_message(self, client, userdata, msg):
        self.commands.append((msg.topic, json.loads(msg.payload), msg.qos))

    def publish_telemetry(self, battery: float, x: float, y: float):
        payload = json.dumps({
            "battery": battery, "position": {"x": x, "y": y},
            "timestamp": time.time(),
        })
        self.client.publish(f"fleet/1/robot/{self.robot_id}/telemetry/position", payload, qos=0)

    def publish_status(self, status: str):
        self.client.publish(
            f"fleet/1/robot/{self.robot_id}/status",
            json.dumps({"status": status}), qos=1, retain=True,
        )


dashboard = Recorder("dashboard", ["fleet/+/robot/+/telemetry/#", "fleet/1/robot/+/status"]).start()

robots = [RobotMQTTClient(rid, HOST, PORT) for rid in ("r7", "r8")]
for r in robots:
    r.client.loop_start()
wait_for(lambda: all(r.ready for r in robots), "robots subscribed to their commands")

wait_for(lambda: len(dashboard.payloads("fleet/1/robot/r7/status")) >= 1, "r7 online status")
assert json.loads(dashboard.payloads("fleet/1/robot/r7/status")[-1]) == {"status": "online"}

for i in range(20):
    robots[0].publish_telemetry(90 - i, i, 2 * i)
wait_for(lambda: len(dashboard.payloads("fleet/1/robot/r7/telemetry/position")) == 20,
         "20 telemetry messages via the wildcard subscription")

# A QoS 2 command from the dashboard reaches r7 exactly once, and not r8.
# A marker to each robot after it, on the same connection, arrives after anything the
# command caused.
dashboard.client.publish("fleet/1/robot/r7/command/velocity", json.dumps({"v": 1.5}), qos=2)
for rid in ("r7", "r8"):
    dashboard.client.publish(f"fleet/1/robot/{rid}/command/marker", json.dumps({}), qos=2)
wait_for(lambda: len(robots[0].commands) >= 2 and len(robots[1].commands) >= 1,
         "r7 got its command, and both robots the marker")
assert robots[0].commands == [("fleet/1/robot/r7/command/velocity", {"v": 1.5}, 2),
                              ("fleet/1/robot/r7/command/marker", {}, 2)], robots[0].commands
assert robots[1].commands == [("fleet/1/robot/r8/command/marker", {}, 2)], \
    "r8 must not see r7's commands"

# r7 loses its connection: the broker publishes its will, retained.
kill_socket(robots[0].client)
wait_for(lambda: json.loads(dashboard.payloads("fleet/1/robot/r7/status")[-1]) == {"status": "offline"},
         "r7 offline will", timeout=15)

# A dashboard that connects later sees every robot's last status at once.
late = Recorder("late-dashboard", ["fleet/1/robot/+/status"]).start()
wait_for(lambda: len(late.messages) >= 2, "retained statuses for the late dashboard")
status = {m[0]: (json.loads(m[1]), m[3]) for m in late.messages}
assert status["fleet/1/robot/r7/status"] == ({"status": "offline"}, True), status
assert status["fleet/1/robot/r8/status"] == ({"status": "online"}, True), status

# r8 disconnects cleanly: no will.
robots[1].client.disconnect()
robots[1].client.loop_stop()
# Once the broker has ended r8's (clean) session, a will would be in the retained
# store: the state machine sets it as it applies the end of the session.
wait_for(lambda: api("/sessions/robot-r8") is None, "r8's session to end")
stored = api("/retained/fleet/1/robot/r8/status")
assert json.loads(stored["payload"]) == {"status": "online"}, stored
assert json.loads(dashboard.payloads("fleet/1/robot/r8/status")[-1]) == {"status": "online"}

dashboard.stop()
late.stop()
print("robot fleet scenario ok")
