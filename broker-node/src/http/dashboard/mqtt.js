// A small MQTT 3.1.1 client over WebSocket, for the dashboard's topic tester.
// It speaks CONNECT, SUBSCRIBE, UNSUBSCRIBE, PUBLISH at QoS 0, 1 and 2 both ways,
// PINGREQ and DISCONNECT; packets may span WebSocket messages and a message may hold
// several packets, so incoming bytes are buffered and cut into packets here.
'use strict';

(function (global) {
  const CONNECT = 1, CONNACK = 2, PUBLISH = 3, PUBACK = 4, PUBREC = 5, PUBREL = 6,
    PUBCOMP = 7, SUBSCRIBE = 8, SUBACK = 9, UNSUBSCRIBE = 10, UNSUBACK = 11,
    PINGREQ = 12, PINGRESP = 13, DISCONNECT = 14;

  const CONNACK_REASONS = {
    1: 'unacceptable protocol version', 2: 'client identifier rejected',
    3: 'server unavailable', 4: 'bad user name or password', 5: 'not authorized',
  };

  const encoder = new TextEncoder();
  const decoder = new TextDecoder();

  function utf8(s) { return encoder.encode(s); }

  // A length-prefixed UTF-8 string or byte string.
  function prefixed(bytes) {
    const out = new Uint8Array(2 + bytes.length);
    out[0] = bytes.length >> 8; out[1] = bytes.length & 0xff;
    out.set(bytes, 2);
    return out;
  }

  function u16(n) { return new Uint8Array([n >> 8, n & 0xff]); }

  function concat(parts) {
    const len = parts.reduce((n, p) => n + p.length, 0);
    const out = new Uint8Array(len);
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  // Fixed header (type, flags, remaining length) in front of the body parts.
  function packet(type, flags, parts) {
    const body = concat(parts);
    const header = [(type << 4) | flags];
    let n = body.length;
    do {
      let byte = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) byte |= 0x80;
      header.push(byte);
    } while (n > 0);
    return concat([new Uint8Array(header), body]);
  }

  // Split `buf` into complete packets: [packets, bytes left over].
  function cut(buf) {
    const packets = [];
    let at = 0;
    for (;;) {
      if (buf.length - at < 2) break;
      let mult = 1, len = 0, i = at + 1, done = false;
      for (; i < buf.length && i < at + 5; i++) {
        len += (buf[i] & 0x7f) * mult;
        mult *= 128;
        if ((buf[i] & 0x80) === 0) { done = true; i++; break; }
      }
      if (!done) {
        if (i >= at + 5) throw new Error('malformed remaining length');
        break;
      }
      if (buf.length - i < len) break;
      packets.push({ type: buf[at] >> 4, flags: buf[at] & 0x0f, body: buf.subarray(i, i + len) });
      at = i + len;
    }
    return [packets, buf.slice(at)];
  }

  class MqttClient {
    // `url`: ws://host:port/mqtt. `options`: clientId, username, password, keepAlive
    // (seconds). Callbacks: onMessage(topic, payloadBytes, {qos, retain}), onClose(reason).
    constructor(url, options) {
      this.url = url;
      this.options = Object.assign({ clientId: '', keepAlive: 30 }, options || {});
      this.onMessage = null;
      this.onClose = null;
      this.nextId = 1;
      this.pending = new Map(); // packet id -> {resolve, reject, kind}
      this.inboundQos2 = new Set();
      this.buffer = new Uint8Array(0);
      this.ws = null;
      this.pinger = null;
      this.connected = false;
    }

    connect() {
      return new Promise((resolve, reject) => {
        let ws;
        try {
          ws = new WebSocket(this.url, ['mqtt']);
        } catch (e) {
          reject(e);
          return;
        }
        ws.binaryType = 'arraybuffer';
        this.ws = ws;
        this.connecting = { resolve, reject };
        ws.onopen = () => ws.send(this.connectPacket());
        ws.onmessage = (ev) => this.received(new Uint8Array(ev.data));
        ws.onerror = () => this.closed('the WebSocket connection failed');
        ws.onclose = (ev) => this.closed(ev.reason || 'connection closed');
      });
    }

    connectPacket() {
      const o = this.options;
      let flags = 0x02; // clean session
      const payload = [prefixed(utf8(o.clientId || ''))];
      if (o.username) { flags |= 0x80; payload.push(prefixed(utf8(o.username))); }
      if (o.username && o.password) { flags |= 0x40; payload.push(prefixed(utf8(o.password))); }
      return packet(CONNECT, 0, [prefixed(utf8('MQTT')), new Uint8Array([4, flags]), u16(o.keepAlive)].concat(payload));
    }

    received(bytes) {
      let packets;
      try {
        [packets, this.buffer] = cut(concat([this.buffer, bytes]));
      } catch (e) {
        this.ws.close();
        return;
      }
      for (const p of packets) this.handle(p);
    }

    handle(p) {
      const b = p.body;
      const id = b.length >= 2 ? (b[0] << 8) | b[1] : 0;
      switch (p.type) {
        case CONNACK: {
          const c = this.connecting;
          this.connecting = null;
          if (!c) return;
          if (b[1] === 0) {
            this.connected = true;
            const every = Math.max(1, this.options.keepAlive) * 1000 / 2;
            this.pinger = setInterval(() => this.send(packet(PINGREQ, 0, [])), every);
            c.resolve(b[0] === 1);
          } else {
            c.reject(new Error('connection refused: ' + (CONNACK_REASONS[b[1]] || 'code ' + b[1])));
            this.ws.close();
          }
          return;
        }
        case PUBLISH: {
          const qos = (p.flags >> 1) & 3;
          const retain = (p.flags & 1) === 1;
          const tlen = (b[0] << 8) | b[1];
          const topic = decoder.decode(b.subarray(2, 2 + tlen));
          let at = 2 + tlen;
          let pid = 0;
          if (qos > 0) { pid = (b[at] << 8) | b[at + 1]; at += 2; }
          const payload = b.slice(at);
          if (qos === 1) this.send(packet(PUBACK, 0, [u16(pid)]));
          if (qos === 2) {
            this.send(packet(PUBREC, 0, [u16(pid)]));
            if (this.inboundQos2.has(pid)) return; // a resend: delivered already
            this.inboundQos2.add(pid);
          }
          if (this.onMessage) this.onMessage(topic, payload, { qos, retain });
          return;
        }
        case PUBREL:
          this.inboundQos2.delete(id);
          this.send(packet(PUBCOMP, 0, [u16(id)]));
          return;
        case PUBREC:
          this.send(packet(PUBREL, 2, [u16(id)]));
          return;
        case PUBACK: case PUBCOMP: case UNSUBACK:
          this.settle(id, null);
          return;
        case SUBACK: {
          const codes = Array.from(b.subarray(2));
          if (codes.some((c) => c === 0x80)) this.settle(id, new Error('subscription refused'));
          else this.settle(id, null, codes);
          return;
        }
        case PINGRESP:
          return;
        default:
          this.ws.close();
      }
    }

    settle(id, error, value) {
      const waiter = this.pending.get(id);
      if (!waiter) return;
      this.pending.delete(id);
      if (error) waiter.reject(error); else waiter.resolve(value);
    }

    closed(reason) {
      if (this.pinger) { clearInterval(this.pinger); this.pinger = null; }
      const wasOpen = this.connected || this.connecting;
      this.connected = false;
      if (this.connecting) { this.connecting.reject(new Error(reason)); this.connecting = null; }
      for (const waiter of this.pending.values()) waiter.reject(new Error(reason));
      this.pending.clear();
      if (wasOpen && this.onClose) this.onClose(reason);
    }

    send(bytes) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes);
    }

    packetId() {
      const id = this.nextId;
      this.nextId = id === 65535 ? 1 : id + 1;
      return id;
    }

    // Resolves once acknowledged (at once for QoS 0).
    waitFor(id) {
      return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
    }

    subscribe(filter, qos) {
      if (!this.connected) return Promise.reject(new Error('not connected'));
      const id = this.packetId();
      const done = this.waitFor(id);
      this.send(packet(SUBSCRIBE, 2, [u16(id), prefixed(utf8(filter)), new Uint8Array([qos & 3])]));
      return done;
    }

    unsubscribe(filter) {
      if (!this.connected) return Promise.reject(new Error('not connected'));
      const id = this.packetId();
      const done = this.waitFor(id);
      this.send(packet(UNSUBSCRIBE, 2, [u16(id), prefixed(utf8(filter))]));
      return done;
    }

    publish(topic, payload, qos, retain) {
      if (!this.connected) return Promise.reject(new Error('not connected'));
      const bytes = typeof payload === 'string' ? utf8(payload) : payload;
      const flags = ((qos & 3) << 1) | (retain ? 1 : 0);
      if (!qos) {
        this.send(packet(PUBLISH, flags, [prefixed(utf8(topic)), bytes]));
        return Promise.resolve();
      }
      const id = this.packetId();
      const done = this.waitFor(id);
      this.send(packet(PUBLISH, flags, [prefixed(utf8(topic)), u16(id), bytes]));
      return done;
    }

    disconnect() {
      this.send(packet(DISCONNECT, 0, []));
      this.connected = false;
      if (this.pinger) { clearInterval(this.pinger); this.pinger = null; }
      if (this.ws) this.ws.close();
    }
  }

  global.MqttClient = MqttClient;
})(window);
