// The chat playground: POST /v1/chat/completions streamed (as any OpenAI client does),
// and beside each answer the route the server chose (its first stream chunk,
// ``chatfleet_route``; the ``x-chatfleet-route`` header until that chunk arrives).
"use strict";

(() => {
  const cf = window.chatfleet;
  const $ = (id) => document.getElementById(id);
  const REASONS = {
    route: "the category's route",
    unclassified: "no category scored above the confidence threshold: the default model",
    unrouted_category: "the category has no route: the default model",
    sticky: "kept the conversation's previous model (hysteresis)",
    fallback: "an earlier model failed before its first token",
  };
  const SHOWN_SCORES = 3;

  const chat = { messages: [], controller: null };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function percent(x) {
    return `${(100 * x).toFixed(x >= 0.995 || x < 0.1 ? 1 : 0)}%`;
  }

  function bar(share) {
    const outer = el("span", "bar");
    const inner = el("span");
    inner.style.width = `${Math.max(0, Math.min(1, share)) * 100}%`;
    outer.append(inner);
    return outer;
  }

  async function loadModels() {
    try {
      const body = await cf.api("v1/models");
      const select = $("pg-model");
      const current = select.value || "auto";
      const ids = body.data.map((m) => m.id);
      select.replaceChildren(new Option("auto", "auto"));
      for (const model of body.data) {
        if (model.id === "auto") continue;
        const option = new Option(model.id, model.id);
        if (model.description) option.title = model.description;
        select.add(option);
      }
      select.value = ids.includes(current) || current === "auto" ? current : "auto";
    } catch (err) {
      // app.js reports 401s and unreachable servers once, for the whole page.
    }
  }

  // ---- the route beside an answer --------------------------------------------------------

  function row(list, name, key, value) {
    const dt = el("dt", "", name);
    const dd = el("dd");
    dd.dataset.route = key;
    if (value instanceof Node) dd.append(value);
    else dd.textContent = value;
    list.append(dt, dd);
    return dd;
  }

  function compressionText(c) {
    if (!c) return "nothing to compress";
    if (c.skipped) return `not needed (${c.original_tokens} tokens)`;
    const saved = c.original_tokens - c.compressed_tokens;
    const share = c.original_tokens ? saved / c.original_tokens : 0;
    return `${c.original_tokens} → ${c.compressed_tokens} tokens (saved ${saved}, ${percent(share)})`;
  }

  function renderRoute(aside, route) {
    aside.replaceChildren(el("h4", "", "Route"));
    aside.dataset.routed = "true";
    const list = el("dl");
    row(list, "Category", "category", route.category || "none");
    const confidence = el("span", "confidence");
    confidence.append(bar(route.confidence), el("span", "", percent(route.confidence)));
    row(list, "Confidence", "confidence", confidence).dataset.value = String(route.confidence);
    row(list, "Model", "model", route.model);
    row(list, "Reason", "reason", route.reason).title = REASONS[route.reason] || "";
    row(list, "Compression", "compression", compressionText(route.compression));
    const fallbacks = route.fallbacks && route.fallbacks.length ? route.fallbacks.join(" → ") : "none";
    row(list, "Fallbacks", "fallbacks", fallbacks);
    if (route.failed_models && route.failed_models.length) {
      row(list, "Failed first", "failed_models", route.failed_models.join(", "));
    }
    aside.append(list);

    const scores = Object.entries(route.scores || {})
      .sort((a, b) => b[1] - a[1])
      .slice(0, SHOWN_SCORES);
    if (scores.length) {
      const ul = el("ul", "scores compact");
      for (const [label, score] of scores) {
        const li = el("li");
        li.dataset.label = label;
        li.append(el("span", "label", label), bar(score), el("span", "score", percent(score)));
        ul.append(li);
      }
      aside.append(el("h5", "", "Scores"), ul);
    }
    if (route.nearest && route.nearest.length) {
      const ol = el("ol", "nearest-list");
      for (const near of route.nearest) {
        const li = el("li");
        li.append(el("q", "", near.example), el("span", "similarity", near.similarity.toFixed(2)));
        ol.append(li);
      }
      aside.append(el("h5", "", `Nearest ${route.category || ""} examples`), ol);
    }
  }

  function renderNamed(aside, model) {
    aside.dataset.routed = "false";
    aside.replaceChildren(
      el("h4", "", "Route"),
      el("p", "muted", `Named model ${model}: no routing (pick auto to let the router choose).`),
    );
  }

  // ---- one turn -------------------------------------------------------------------------

  function addTurn(text) {
    $("pg-empty").hidden = true;
    const turn = el("div", "turn");
    turn.append(el("p", "prompt", text));
    const row = el("div", "answer-row");
    const bubble = el("div", "answer");
    const thinking = el("details", "thinking");
    thinking.open = $("pg-thinking").checked;
    thinking.hidden = true;
    thinking.append(el("summary", "", "Thinking"), el("pre", "stream thinking-text"));
    const content = el("pre", "stream answer-text live");
    content.dataset.empty = "waiting…";
    const meta = el("p", "answer-meta muted");
    const error = el("p", "error-text");
    error.hidden = true;
    bubble.append(thinking, content, meta, error);
    const aside = el("aside", "route");
    aside.append(el("h4", "", "Route"), el("p", "muted", "deciding…"));
    row.append(bubble, aside);
    turn.append(row);
    $("pg-transcript").append(turn);
    turn.scrollIntoView({ block: "end" });
    return { turn, thinking, content, meta, error, aside };
  }

  async function post(body, signal, retried = false) {
    const headers = { "Content-Type": "application/json" };
    const token = cf.token();
    if (token) headers.Authorization = "Bearer " + token;
    const res = await fetch(cf.apiUrl("v1/chat/completions"), {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal,
    });
    if (res.status === 401 && !retried && (await cf.tryRefresh())) return post(body, signal, true);
    return res;
  }

  async function* events(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function send(event) {
    event.preventDefault();
    if (chat.controller) return;
    const text = $("pg-message").value.trim();
    if (!text) return;
    const model = $("pg-model").value || "auto";
    chat.messages.push({ role: "user", content: text });
    $("pg-message").value = "";
    const view = addTurn(text);
    const controller = new AbortController();
    chat.controller = controller;
    $("pg-send").disabled = true;
    $("pg-stop").disabled = false;
    const started = performance.now();
    let firstAt = null;
    let answer = "";
    let thought = "";
    let usage = null;
    let answeredBy = model;
    let failed = null;
    try {
      const res = await post(
        { model, messages: chat.messages, stream: true, stream_options: { include_usage: true } },
        controller.signal,
      );
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        const message = (body && body.error && body.error.message) || res.statusText;
        if (res.status === 401) cf.unauthorized(message);
        throw new Error(`${res.status}: ${message}`);
      }
      cf.authorized();
      const header = res.headers.get("x-chatfleet-route");
      if (header) renderRoute(view.aside, JSON.parse(header));
      else if (model !== "auto") renderNamed(view.aside, model);
      for await (const chunk of events(res)) {
        if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
        if (chunk.chatfleet_route) renderRoute(view.aside, chunk.chatfleet_route);
        if (chunk.model) answeredBy = chunk.model;
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (!delta) continue;
        if (delta.reasoning_content) {
          thought += delta.reasoning_content;
          view.thinking.hidden = false;
          view.thinking.querySelector("pre").textContent = thought;
        }
        if (delta.content) {
          answer += delta.content;
          view.content.textContent = answer;
        }
        if (firstAt === null && (delta.reasoning_content || delta.content)) firstAt = performance.now();
      }
    } catch (err) {
      failed = err.name === "AbortError" ? "stopped" : err.message;
    } finally {
      chat.controller = null;
      $("pg-send").disabled = false;
      $("pg-stop").disabled = true;
    }
    view.content.classList.remove("live");
    view.content.dataset.empty = failed ? "no answer" : "(empty answer)";
    const seconds = (performance.now() - started) / 1000;
    const facts = [answeredBy];
    if (usage) facts.push(`${usage.completion_tokens} tokens`);
    if (firstAt !== null) facts.push(`first token ${Math.round(firstAt - started)} ms`);
    facts.push(`${seconds.toFixed(1)} s`);
    view.meta.textContent = facts.join(" · ");
    view.turn.dataset.state = failed ? "failed" : "done";
    if (failed) {
      view.error.hidden = false;
      view.error.textContent = failed === "stopped" ? "Stopped." : "Failed: " + failed;
      if (view.aside.dataset.routed === undefined) view.aside.querySelector("p").textContent = "—";
    }
    // Only a whole answer joins the chat; a failed or stopped turn leaves it as it was.
    if (answer && !failed) chat.messages.push({ role: "assistant", content: answer });
    else chat.messages.pop();
  }

  function clear() {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    const transcript = $("pg-transcript");
    transcript.replaceChildren($("pg-empty"));
    $("pg-empty").hidden = false;
  }

  $("pg-form").addEventListener("submit", send);
  $("pg-message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send(event);
  });
  $("pg-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("pg-clear").addEventListener("click", clear);
  window.addEventListener("chatfleet:token", loadModels);
  loadModels();
})();
