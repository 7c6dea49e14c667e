// chatfleet dashboard: the live event stream (WS /ws) with its connection indicator,
// heartbeat, and reconnection with jittered exponential backoff. One listener
// (sessions.js) gets every event but the heartbeat's. Uses app.js's `window.chatfleet`.
"use strict";

(() => {
  const HEARTBEAT_MS = 15000; // we ping the server this often...
  const SILENCE_MS = 45000; // ...and give up on a connection this quiet
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const WS_POLICY_VIOLATION = 1008; // bad or expired token

  const cf = window.chatfleet;
  const $ = (id) => document.getElementById(id);

  const state = {
    ws: null,
    attempt: 0,
    retryAt: 0,
    retryTimer: null,
    countdownTimer: null,
    heartbeatTimer: null,
    lastFrameAt: 0,
    listener: () => {},
  };

  function setConnection(kind, text) {
    $("connection").dataset.state = kind;
    $("connection-text").textContent = text;
  }

  function closeSocket() {
    clearTimeout(state.retryTimer);
    clearInterval(state.countdownTimer);
    clearInterval(state.heartbeatTimer);
    state.retryTimer = state.countdownTimer = state.heartbeatTimer = null;
    const ws = state.ws;
    state.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      ws.close();
    }
  }

  function connect() {
    closeSocket();
    if (cf.isUnauthorized()) return;
    const url = new URL("ws", cf.base);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (cf.token()) url.searchParams.set("token", cf.token());
    setConnection(state.attempt ? "reconnecting" : "connecting", "connecting…");
    const ws = new WebSocket(url);
    state.ws = ws;
    let refused = null;
    ws.onmessage = (message) => {
      state.lastFrameAt = Date.now();
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (event.type === "error" && event.code === "invalid_token") refused = event.error;
      else receive(event);
    };
    ws.onclose = (close) => {
      if (state.ws !== ws) return;
      state.ws = null;
      clearInterval(state.heartbeatTimer);
      if (close.code === WS_POLICY_VIOLATION) {
        cf.unauthorized(refused || close.reason || "the event stream refused the token");
        return;
      }
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const jittered = delay * (0.8 + 0.4 * Math.random());
    state.attempt += 1;
    state.retryAt = Date.now() + jittered;
    const tick = () => {
      const seconds = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
      setConnection("reconnecting", `reconnecting in ${seconds} s (attempt ${state.attempt})`);
    };
    tick();
    state.countdownTimer = setInterval(tick, 250);
    state.retryTimer = setTimeout(connect, jittered);
  }

  function startHeartbeat() {
    clearInterval(state.heartbeatTimer);
    state.heartbeatTimer = setInterval(() => {
      const ws = state.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      if (Date.now() - state.lastFrameAt > SILENCE_MS) {
        // A dead peer (no pings, no pongs): drop it and reconnect.
        ws.close();
        state.ws = null;
        scheduleReconnect();
        return;
      }
      ws.send(JSON.stringify({ type: "ping" }));
    }, HEARTBEAT_MS);
  }

  function receive(event) {
    switch (event.type) {
      case "connected":
        state.attempt = 0;
        setConnection("live", "live");
        startHeartbeat();
        break;
      case "ping":
        if (state.ws) state.ws.send(JSON.stringify({ type: "pong" }));
        return;
      case "pong":
        return;
      default:
        break;
    }
    state.listener(event);
  }

  function reconnectNow() {
    state.attempt = 0;
    connect();
  }

  window.addEventListener("online", () => {
    if (!state.ws && !cf.isUnauthorized()) reconnectNow();
  });
  window.addEventListener("chatfleet:token", reconnectNow);
  window.addEventListener("chatfleet:unauthorized", () => {
    setConnection("unauthorized", "not authorized");
    closeSocket();
  });
  window.addEventListener("chatfleet:forgotten", () => {
    closeSocket();
    setConnection("offline", "offline");
  });

  cf.live = {
    /** Connect and send every event to ``listener`` (one listener: the last given). */
    listen(listener) {
      state.listener = listener;
      connect();
    },
    /** Send a frame (e.g. ``resume``) if the socket is open; false otherwise. */
    send(frame) {
      if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
      state.ws.send(JSON.stringify(frame));
      return true;
    },
  };
})();
