// chatfleet dashboard: the token, the views, and sessions over the public API with
// live events from WS /ws. The playground, classify/compress and the live figures are
// in their own files and use what this one shares as `window.chatfleet`.
// Plain JavaScript, no build step, no third-party code (it must work offline).
"use strict";

(() => {
  const TOKEN_KEY = "chatfleet.token";
  const REFRESH_KEY = "chatfleet.refresh_token";
  const LIST_REFRESH_MS = 15000;
  const HEARTBEAT_MS = 15000; // we ping the server this often...
  const SILENCE_MS = 45000; // ...and give up on a connection this quiet
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const WS_POLICY_VIOLATION = 1008; // bad or expired token
  const FINISHED = new Set(["completed", "failed", "cancelled"]);
  const VIEW_KEY = "chatfleet.view";
  const VIEWS = ["playground", "sessions", "tools"];

  const $ = (id) => document.getElementById(id);

  // The page may be served under a path prefix: resolve every URL against it.
  const base = (() => {
    const url = new URL(location.href);
    url.hash = "";
    url.search = "";
    if (!url.pathname.endsWith("/")) url.pathname += "/";
    return url;
  })();
  const apiUrl = (path) => new URL(path, base).toString();

  const state = {
    token: null,
    sessions: new Map(), // id -> session record (+ local fields)
    selected: null,
    ws: null,
    attempt: 0,
    retryAt: 0,
    retryTimer: null,
    countdownTimer: null,
    heartbeatTimer: null,
    lastFrameAt: 0,
    unauthorized: false,
    renderQueued: false,
    listDirty: true,
  };

  // ---- token -------------------------------------------------------------------

  function loadToken() {
    // A token in the fragment (/#token=...) wins; the fragment never reaches a server.
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get("token");
    if (given) {
      saveToken(given, null);
      fragment.delete("token");
      const rest = fragment.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    state.token = localStorage.getItem(TOKEN_KEY);
  }

  function saveToken(token, refreshToken) {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
    if (refreshToken) localStorage.setItem(REFRESH_KEY, refreshToken);
    else if (refreshToken === null) localStorage.removeItem(REFRESH_KEY);
    state.token = token || null;
  }

  async function tryRefresh() {
    const refreshToken = localStorage.getItem(REFRESH_KEY);
    if (!refreshToken) return false;
    try {
      const res = await fetch(apiUrl("auth/refresh"), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ refresh_token: refreshToken }),
      });
      if (!res.ok) {
        localStorage.removeItem(REFRESH_KEY);
        return false;
      }
      const body = await res.json();
      saveToken(body.access_token, body.refresh_token);
      return true;
    } catch (err) {
      return false;
    }
  }

  // ---- HTTP --------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options = {}, retried = false) {
    const headers = Object.assign({}, options.headers || {});
    if (state.token) headers.Authorization = "Bearer " + state.token;
    if (options.body !== undefined && !headers["Content-Type"]) {
      headers["Content-Type"] = "application/json";
    }
    let res;
    try {
      res = await fetch(apiUrl(path), Object.assign({}, options, { headers }));
    } catch (err) {
      throw new HttpError(0, "the server cannot be reached");
    }
    let body = null;
    try {
      body = await res.json();
    } catch (err) {
      body = null;
    }
    if (res.status === 401 && !retried && (await tryRefresh())) {
      return api(path, options, true);
    }
    if (!res.ok) {
      const message = (body && body.error && body.error.message) || res.statusText || "error";
      const error = new HttpError(res.status, message);
      if (res.status === 401) unauthorized(message);
      throw error;
    }
    if (state.unauthorized) authorized();
    return body;
  }

  // ---- banner, auth panel --------------------------------------------------------

  function showBanner(text, kind = "error") {
    const banner = $("banner");
    banner.textContent = text;
    banner.className = "banner" + (kind === "info" ? " info" : "");
    banner.hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  function unauthorized(message) {
    state.unauthorized = true;
    const what = state.token ? "The token was refused" : "This server requires a token";
    const why = String(message).replace(/\.+$/, "");
    showBanner(
      `Not authorized (401): ${what} — ${why}. ` +
        "Paste a valid access token, or get one with a client id and secret.",
    );
    $("auth-panel").hidden = false;
    setConnection("unauthorized", "not authorized");
    closeSocket();
  }

  function authorized() {
    state.unauthorized = false;
    hideBanner();
  }

  async function useNewToken() {
    authorized();
    $("auth-panel").hidden = true;
    state.attempt = 0;
    closeSocket();
    connect();
    window.dispatchEvent(new Event("chatfleet:token"));
    await Promise.allSettled([loadModels(), refreshSessions()]);
  }

  // ---- views -----------------------------------------------------------------------

  function showView(name) {
    const view = VIEWS.includes(name) ? name : VIEWS[0];
    for (const section of document.querySelectorAll(".view")) {
      section.hidden = section.dataset.view !== view;
    }
    for (const tab of document.querySelectorAll(".tab")) {
      const selected = tab.dataset.view === view;
      tab.classList.toggle("selected", selected);
      tab.setAttribute("aria-selected", String(selected));
    }
    // Per tab, so a reload keeps the view while another tab may show another one.
    sessionStorage.setItem(VIEW_KEY, view);
  }

  // ---- sessions ------------------------------------------------------------------

  function upsert(record, { fromList = false } = {}) {
    const existing = state.sessions.get(record.id);
    if (!existing) {
      const fresh = Object.assign({ thinking: "", response: "" }, record);
      // Listed while running: its text so far is a checkpoint, the rest streams live.
      fresh.joinedLate = fromList && !FINISHED.has(record.status);
      state.sessions.set(record.id, fresh);
      state.listDirty = true;
      return fresh;
    }
    const live = !FINISHED.has(record.status || existing.status);
    for (const [key, value] of Object.entries(record)) {
      if (value === undefined) continue;
      // A stored checkpoint may lag what already streamed in: keep the longer text.
      if (live && (key === "thinking" || key === "response")) {
        if ((existing[key] || "").length > (value || "").length) continue;
      }
      if (key === "status" && existing.status !== value) state.listDirty = true;
      existing[key] = value;
    }
    if (!live) existing.joinedLate = false;
    return existing;
  }

  function sessionFor(id) {
    return state.sessions.get(id) || upsert({ id, status: "running", message: "" });
  }

  function sortedSessions() {
    return [...state.sessions.values()].sort((a, b) =>
      (b.created_at || "").localeCompare(a.created_at || ""),
    );
  }

  async function refreshSessions() {
    try {
      const body = await api("api/sessions?limit=100");
      for (const record of body.data) upsert(record, { fromList: true });
      state.listDirty = true;
      scheduleRender();
    } catch (err) {
      if (err.status !== 401) showBanner("Could not load sessions: " + err.message);
    }
  }

  async function loadModels() {
    try {
      const body = await api("v1/models");
      const select = $("model");
      const current = select.value;
      select.replaceChildren(new Option("default", ""));
      for (const model of body.data) {
        const option = new Option(model.id, model.id);
        if (model.description) option.title = model.description;
        select.add(option);
      }
      select.value = current;
      if (select.value !== current) select.value = "";
    } catch (err) {
      if (err.status !== 401) showBanner("Could not load models: " + err.message);
    }
  }

  async function send(event) {
    event.preventDefault();
    const message = $("message").value.trim();
    if (!message) return;
    const payload = { message };
    if ($("model").value) payload.model = $("model").value;
    $("send").disabled = true;
    try {
      const session = await api("api/sessions", { method: "POST", body: JSON.stringify(payload) });
      upsert(session);
      select(session.id);
      $("message").value = "";
    } catch (err) {
      if (err.status !== 401) showBanner("Could not start a session: " + err.message);
    } finally {
      $("send").disabled = false;
    }
  }

  async function cancelSelected() {
    const id = state.selected;
    if (!id) return;
    $("cancel").disabled = true;
    try {
      upsert(await api(`api/sessions/${encodeURIComponent(id)}/cancel`, { method: "POST" }));
    } catch (err) {
      if (err.status === 409) {
        showBanner("That session had already finished.", "info");
        refreshSessions();
      } else if (err.status !== 401) {
        showBanner("Could not cancel: " + err.message);
      }
    }
    scheduleRender();
  }

  function select(id) {
    state.selected = id;
    state.listDirty = true;
    scheduleRender();
    const session = state.sessions.get(id);
    // The list carries checkpoints; a finished session's full text is in its record.
    if (session && FINISHED.has(session.status) && !session.finished_at) loadSession(id);
  }

  async function loadSession(id) {
    try {
      upsert(await api(`api/sessions/${encodeURIComponent(id)}`));
      scheduleRender();
    } catch (err) {
      if (err.status !== 401) showBanner("Could not load the session: " + err.message);
    }
  }

  // ---- live events (WS /ws) ------------------------------------------------------

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
    if (state.unauthorized) return;
    const url = new URL("ws", base);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (state.token) url.searchParams.set("token", state.token);
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
      else onEvent(event);
    };
    ws.onclose = (close) => {
      if (state.ws !== ws) return;
      state.ws = null;
      clearInterval(state.heartbeatTimer);
      if (close.code === WS_POLICY_VIOLATION) {
        unauthorized(refused || close.reason || "the event stream refused the token");
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

  function onEvent(event) {
    switch (event.type) {
      case "connected":
        state.attempt = 0;
        setConnection("live", "live");
        startHeartbeat();
        // Catch up on whatever happened while we were away.
        refreshSessions();
        return;
      case "ping":
        if (state.ws) state.ws.send(JSON.stringify({ type: "pong" }));
        return;
      case "pong":
        return;
      case "session.created":
        upsert(event.session);
        break;
      case "llm.thinking": {
        const session = sessionFor(event.session_id);
        if (event.is_complete) {
          session.thinking = event.content;
          session.thinkingDone = true;
        } else {
          session.thinking += event.delta;
        }
        markRunning(session);
        break;
      }
      case "llm.response": {
        const session = sessionFor(event.session_id);
        session.thinkingDone = true;
        if (event.is_final) session.response = event.content;
        else session.response += event.delta;
        if (!event.is_final) markRunning(session);
        break;
      }
      case "session.completed":
      case "session.failed":
      case "session.cancelled": {
        const status = event.type.slice("session.".length);
        const record = Object.assign({}, event.session, { status });
        if (event.error) record.error = event.error;
        upsert(record);
        break;
      }
      case "error":
        showBanner("Event stream: " + event.error);
        return;
      default:
        return;
    }
    scheduleRender();
  }

  function markRunning(session) {
    if (session.status === "pending") {
      session.status = "running";
      state.listDirty = true;
    }
  }

  // ---- rendering ---------------------------------------------------------------------

  function scheduleRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      if (state.listDirty) renderList();
      renderDetail();
    });
  }

  function time(iso) {
    return iso ? new Date(iso).toLocaleTimeString() : "";
  }

  function badge(status) {
    const span = document.createElement("span");
    span.className = "badge " + status;
    span.textContent = status;
    return span;
  }

  function renderList() {
    state.listDirty = false;
    const list = $("sessions");
    const items = sortedSessions().map((session) => {
      const li = document.createElement("li");
      li.className = "session-item" + (session.id === state.selected ? " selected" : "");
      li.dataset.sessionId = session.id;
      li.dataset.status = session.status;
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = session.message || session.id;
      title.title = session.message || "";
      const sub = document.createElement("span");
      sub.className = "sub";
      sub.textContent = [session.model, time(session.created_at)].filter(Boolean).join(" · ");
      li.append(title, badge(session.status), sub);
      li.addEventListener("click", () => select(session.id));
      return li;
    });
    list.replaceChildren(...items);
    $("sessions-empty").hidden = items.length > 0;
  }

  function renderDetail() {
    const session = state.selected && state.sessions.get(state.selected);
    $("detail").hidden = !session;
    $("detail-empty").hidden = Boolean(session);
    if (!session) return;
    const live = !FINISHED.has(session.status);
    $("detail").dataset.sessionId = session.id;
    const status = $("detail-status");
    status.className = "badge " + session.status;
    status.textContent = session.status;
    $("detail-model").textContent = session.model || "";
    const meta = [];
    if (session.completion_tokens) meta.push(`${session.completion_tokens} tokens`);
    if (session.started_at && session.finished_at) {
      const seconds = (new Date(session.finished_at) - new Date(session.started_at)) / 1000;
      meta.push(`${seconds.toFixed(1)} s`);
    }
    if (session.created_at) meta.push(time(session.created_at));
    $("detail-meta").textContent = meta.join(" · ");
    $("detail-message").textContent = session.message;
    $("detail-error").hidden = !session.error;
    $("detail-error").textContent = session.error || "";
    $("detail-note").hidden = !(live && session.joinedLate);
    $("detail-note").textContent =
      "Joined while it was running: text streamed before this page connected appears when it finishes.";
    const thinking = $("thinking");
    const response = $("response");
    if (thinking.textContent !== session.thinking) thinking.textContent = session.thinking || "";
    if (response.textContent !== session.response) response.textContent = session.response || "";
    const answering = live && session.response.length > 0;
    thinking.classList.toggle("live", live && !session.thinkingDone && !answering);
    response.classList.toggle("live", answering || (live && session.thinkingDone));
    thinking.dataset.empty = live ? "waiting…" : "no reasoning from this model";
    response.dataset.empty = live ? "waiting…" : "no answer";
    $("cancel").disabled = !live;
  }

  // ---- start -----------------------------------------------------------------------

  function wire() {
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => showView(tab.dataset.view));
    }
    $("composer").addEventListener("submit", send);
    $("message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send(event);
    });
    $("cancel").addEventListener("click", cancelSelected);
    $("refresh").addEventListener("click", refreshSessions);
    $("auth-toggle").addEventListener("click", () => {
      $("auth-panel").hidden = !$("auth-panel").hidden;
    });
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      saveToken(token, null);
      $("token-input").value = "";
      useNewToken();
    });
    $("client-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = new URLSearchParams({
        client_id: $("client-id").value.trim(),
        client_secret: $("client-secret").value,
      });
      try {
        const res = await fetch(apiUrl("auth/token"), { method: "POST", body: form });
        const body = await res.json().catch(() => null);
        if (!res.ok) {
          const message = (body && body.error && body.error.message) || res.statusText;
          showBanner(`Could not get a token (${res.status}): ${message}`);
          return;
        }
        $("client-secret").value = "";
        saveToken(body.access_token, body.refresh_token);
        useNewToken();
      } catch (err) {
        showBanner("Could not get a token: the server cannot be reached");
      }
    });
    $("forget-token").addEventListener("click", () => {
      saveToken(null, null);
      closeSocket();
      showBanner("Token forgotten.", "info");
      setConnection("offline", "offline");
    });
    window.addEventListener("online", () => {
      if (!state.ws && !state.unauthorized) {
        state.attempt = 0;
        connect();
      }
    });
    setInterval(() => {
      if (!state.unauthorized && document.visibilityState === "visible") refreshSessions();
    }, LIST_REFRESH_MS);
  }

  // What the other scripts of the page share (they load after this one, deferred).
  window.chatfleet = {
    api,
    apiUrl,
    HttpError,
    showBanner,
    hideBanner,
    token: () => state.token,
    tryRefresh,
    unauthorized,
    authorized: () => {
      if (state.unauthorized) authorized();
    },
  };

  loadToken();
  showView(sessionStorage.getItem(VIEW_KEY));
  wire();
  renderList();
  renderDetail();
  connect();
  loadModels();
  refreshSessions();
})();
