// chatfleet dashboard: background sessions over the public API, live events
// (thinking and answer as they stream) from WS /ws through live.js. Uses app.js's
// `window.chatfleet`.
"use strict";

(() => {
  const LIST_REFRESH_MS = 15000;
  const FINISHED = new Set(["completed", "failed", "cancelled", "interrupted"]);

  const cf = window.chatfleet;
  const $ = (id) => document.getElementById(id);

  const state = {
    sessions: new Map(), // id -> session record (+ local fields)
    selected: null,
    renderQueued: false,
    listDirty: true,
  };

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
      // A running session's text is its events' once this page follows them in order
      // (`lastSeq`) or replays them (`resuming`); before that, a stored checkpoint, the
      // longer the better.
      if (live && (key === "thinking" || key === "response")) {
        if (existing.lastSeq || existing.resuming) continue;
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
      const body = await cf.api("api/sessions?limit=100");
      for (const record of body.data) upsert(record, { fromList: true });
      state.listDirty = true;
      scheduleRender();
    } catch (err) {
      if (err.status !== 401) cf.showBanner("Could not load sessions: " + err.message);
    }
  }

  /** After a (re)connect or a reload: a running session whose events this page has not
   * followed from its first is replayed from it (the server keeps them, numbered by
   * `seq`), so its panes hold every token once, not a checkpoint plus what came next. */
  async function resumeRunning() {
    await refreshSessions();
    for (const session of state.sessions.values()) {
      if (FINISHED.has(session.status) || session.lastSeq) continue;
      session.thinking = "";
      session.response = "";
      session.thinkingDone = false;
      session.joinedLate = false;
      session.resuming = true; // its text comes from the replay: no checkpoint over it
      cf.live.send({ type: "resume", session_id: session.id, after: 0 });
    }
    scheduleRender();
  }

  /** Whether ``event`` is the next of its session: events apply strictly in `seq` order.
   * One already applied (a replay repeats live ones) or one past a gap (live, ahead of a
   * replay that will bring it in order) is left out. */
  function inOrder(event) {
    if (!event.session_id || !event.seq) return true;
    const session = sessionFor(event.session_id);
    if (event.seq !== (session.lastSeq || 0) + 1) return false;
    session.lastSeq = event.seq;
    return true;
  }

  async function loadModels() {
    try {
      const body = await cf.api("v1/models");
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
      if (err.status !== 401) cf.showBanner("Could not load models: " + err.message);
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
      const session = await cf.api("api/sessions", { method: "POST", body: JSON.stringify(payload) });
      upsert(session);
      select(session.id);
      $("message").value = "";
    } catch (err) {
      if (err.status !== 401) cf.showBanner("Could not start a session: " + err.message);
    } finally {
      $("send").disabled = false;
    }
  }

  async function cancelSelected() {
    const id = state.selected;
    if (!id) return;
    $("cancel").disabled = true;
    try {
      upsert(await cf.api(`api/sessions/${encodeURIComponent(id)}/cancel`, { method: "POST" }));
    } catch (err) {
      if (err.status === 409) {
        cf.showBanner("That session had already finished.", "info");
        refreshSessions();
      } else if (err.status !== 401) {
        cf.showBanner("Could not cancel: " + err.message);
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
      upsert(await cf.api(`api/sessions/${encodeURIComponent(id)}`));
      scheduleRender();
    } catch (err) {
      if (err.status !== 401) cf.showBanner("Could not load the session: " + err.message);
    }
  }

  function onEvent(event) {
    if (!inOrder(event)) return;
    switch (event.type) {
      case "connected":
        // Catch up on whatever happened while we were away.
        resumeRunning();
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
      case "session.cancelled":
      case "session.interrupted": {
        const status = event.type.slice("session.".length);
        const record = Object.assign({}, event.session, { status });
        if (event.error) record.error = event.error;
        upsert(record);
        break;
      }
      case "error":
        cf.showBanner("Event stream: " + event.error);
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

  function wire() {
    $("composer").addEventListener("submit", send);
    $("message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send(event);
    });
    $("cancel").addEventListener("click", cancelSelected);
    $("refresh").addEventListener("click", refreshSessions);
    setInterval(() => {
      if (!cf.isUnauthorized() && document.visibilityState === "visible") refreshSessions();
    }, LIST_REFRESH_MS);
    window.addEventListener("chatfleet:token", () => {
      loadModels();
      refreshSessions();
    });
  }

  wire();
  renderList();
  renderDetail();
  cf.live.listen(onEvent);
  loadModels();
  refreshSessions();
})();
