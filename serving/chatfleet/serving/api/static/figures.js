// Live figures per model, computed here from periodic scrapes of the server's own
// GET /metrics (the Prometheus text format): what Prometheus and Grafana would show,
// with no second API to keep in step with the registry. Rates are taken between
// scrapes, quantiles from the histogram's bucket gains, as PromQL's rate() and
// histogram_quantile() do.
"use strict";

(() => {
  const SCRAPE_MS = 2000;
  const RATE_WINDOW_MS = 10000; // tokens/s over the scrapes of the last 10 s
  const QUANTILE_WINDOW_MS = 60000; // TTFT quantiles over the last minute
  const KEEP_MS = QUANTILE_WINDOW_MS + 2 * SCRAPE_MS;
  const TTFT = "chatfleet_time_to_first_token_seconds";
  const cf = window.chatfleet;
  const $ = (id) => document.getElementById(id);

  // ---- the Prometheus text format ---------------------------------------------------

  function parseLabels(text, start) {
    // From just after "{" to the matching "}"; values are quoted with \\, \" and \n escapes.
    const labels = {};
    let i = start;
    while (i < text.length) {
      while (text[i] === " " || text[i] === ",") i += 1;
      if (text[i] === "}") return [labels, i + 1];
      const eq = text.indexOf("=", i);
      if (eq < 0 || text[eq + 1] !== '"') throw new Error("bad label at " + i);
      const name = text.slice(i, eq).trim();
      let value = "";
      let j = eq + 2;
      for (; j < text.length && text[j] !== '"'; j += 1) {
        if (text[j] === "\\") {
          j += 1;
          value += text[j] === "n" ? "\n" : text[j];
        } else {
          value += text[j];
        }
      }
      labels[name] = value;
      i = j + 1;
    }
    throw new Error("unterminated labels");
  }

  function parseValue(text) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    if (text === "NaN") return NaN;
    const value = Number(text);
    if (text === "" || Number.isNaN(value)) throw new Error("not a value: " + text);
    return value;
  }

  /** Samples by metric name: {name: [{labels, value}]}; comments and bad lines skipped. */
  function parse(text) {
    const samples = {};
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (!line || line.startsWith("#")) continue;
      try {
        const brace = line.indexOf("{");
        const space = line.indexOf(" ");
        let name, labels, rest;
        if (brace >= 0 && (space < 0 || brace < space)) {
          name = line.slice(0, brace);
          [labels, rest] = parseLabels(line, brace + 1);
          rest = line.slice(rest).trim();
        } else {
          if (space < 0) continue;
          name = line.slice(0, space);
          labels = {};
          rest = line.slice(space + 1).trim();
        }
        const value = parseValue(rest.split(/\s+/)[0]);
        (samples[name] = samples[name] || []).push({ labels, value });
      } catch (err) {
        continue;
      }
    }
    return samples;
  }

  function sum(samples, name, match) {
    let total = 0;
    for (const s of samples[name] || []) {
      if (Object.entries(match).every(([k, v]) => s.labels[k] === v)) total += s.value;
    }
    return total;
  }

  /** A counter's gain from ``before`` to ``after``; a reset (restart) counts from zero. */
  function gain(before, after) {
    return after >= before ? after - before : after;
  }

  /** Cumulative buckets [[le, count]] of one model's histogram, sorted by le. */
  function buckets(samples, name, model) {
    const out = [];
    for (const s of samples[name + "_bucket"] || []) {
      if (s.labels.model !== model) continue;
      try {
        out.push([parseValue(s.labels.le), s.value]);
      } catch (err) {
        continue; // a bucket without a bound is no bucket
      }
    }
    return out.sort((a, b) => a[0] - b[0]);
  }

  /** PromQL's histogram_quantile over cumulative buckets; null without observations. */
  function quantile(q, cumulative) {
    if (!cumulative.length) return null;
    const total = cumulative[cumulative.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let index = cumulative.findIndex(([, count]) => count >= rank);
    if (index < 0) index = cumulative.length - 1;
    const [upper, count] = cumulative[index];
    if (upper === Infinity) {
      // Prometheus answers the highest finite bound: the +Inf bucket has no width.
      return cumulative.length > 1 ? cumulative[cumulative.length - 2][0] : null;
    }
    const [lower, below] = index > 0 ? cumulative[index - 1] : [0, 0];
    if (count === below) return upper;
    return lower + (upper - lower) * ((rank - below) / (count - below));
  }

  /** The buckets' gains between two scrapes (the observations in between). */
  function bucketGains(before, after) {
    const old = new Map(before);
    return after.map(([le, count]) => [le, gain(old.get(le) || 0, count)]);
  }

  // ---- figures -------------------------------------------------------------------------

  const history = []; // [{at, samples}], oldest first
  let knownModels = [];

  function oldestWithin(windowMs, now) {
    return history.find((scrape) => now - scrape.at <= windowMs) || history[0];
  }

  function figuresFor(model) {
    const latest = history[history.length - 1];
    const now = latest.at;
    const m = { model };
    const s = latest.samples;
    m.streams = sum(s, "chatfleet_active_streams", { model });
    m.errors = sum(s, "chatfleet_generations_total", { model, finish_reason: "error" });
    m.answers = sum(s, "chatfleet_generations_total", { model });

    const base = oldestWithin(RATE_WINDOW_MS, now);
    const output = { model, type: "output" };
    const seconds = (now - base.at) / 1000;
    m.tokensPerSecond =
      seconds > 0
        ? gain(sum(base.samples, "chatfleet_tokens_total", output), sum(s, "chatfleet_tokens_total", output)) /
          seconds
        : null;

    const cumulative = buckets(s, TTFT, model);
    const recent = bucketGains(buckets(oldestWithin(QUANTILE_WINDOW_MS, now).samples, TTFT, model), cumulative);
    // The last minute when it had first tokens; else everything since the server started.
    const windowed = recent.length > 0 && recent[recent.length - 1][1] > 0 && history.length > 1;
    const chosen = windowed ? recent : cumulative;
    m.ttftWindow = windowed ? "last minute" : "since start";
    m.ttftP50 = quantile(0.5, chosen);
    m.ttftP95 = quantile(0.95, chosen);
    return m;
  }

  function modelsSeen(samples) {
    const seen = new Set(knownModels);
    for (const name of ["chatfleet_active_streams", "chatfleet_generations_total", TTFT + "_count"]) {
      for (const s of samples[name] || []) if (s.labels.model) seen.add(s.labels.model);
    }
    return [...seen].sort();
  }

  // ---- rendering -------------------------------------------------------------------------

  function duration(seconds) {
    if (seconds === null) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  }

  function cell(name, value, text, title) {
    const td = document.createElement("td");
    td.dataset.figure = name;
    td.dataset.value = value === null ? "" : String(value);
    td.textContent = text;
    if (title) td.title = title;
    return td;
  }

  function render() {
    const latest = history[history.length - 1];
    const rows = modelsSeen(latest.samples).map((model) => {
      const m = figuresFor(model);
      const tr = document.createElement("tr");
      tr.dataset.model = model;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = model;
      const ttftTitle = `from first tokens ${m.ttftWindow}`;
      tr.append(
        name,
        cell("streams", m.streams, String(m.streams)),
        cell(
          "tokens_per_second",
          m.tokensPerSecond,
          m.tokensPerSecond === null ? "—" : m.tokensPerSecond.toFixed(1),
        ),
        cell("ttft_p50", m.ttftP50, duration(m.ttftP50), ttftTitle),
        cell("ttft_p95", m.ttftP95, duration(m.ttftP95), ttftTitle),
        cell("errors", m.errors, String(m.errors)),
        cell("answers", m.answers, String(m.answers)),
      );
      tr.classList.toggle("busy", m.streams > 0);
      tr.classList.toggle("failing", m.errors > 0);
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 7;
      td.className = "empty";
      td.textContent = "No model has answered yet.";
      tr.append(td);
      rows.push(tr);
    }
    $("figures-body").replaceChildren(...rows);
    const status = $("figures-status");
    status.textContent = `from GET /metrics every ${SCRAPE_MS / 1000} s · updated ${new Date(
      latest.at,
    ).toLocaleTimeString()}`;
    status.classList.remove("error-text");
    $("figures").dataset.scrapes = String(history.length);
  }

  async function loadModels() {
    try {
      const body = await cf.api("v1/models");
      // "auto" is the router's name, never a model that answers.
      knownModels = body.data.map((m) => m.id).filter((id) => id !== "auto");
    } catch (err) {
      knownModels = [];
    }
  }

  async function scrape() {
    if (document.visibilityState === "hidden") return;
    try {
      const res = await fetch(cf.apiUrl("metrics"), { cache: "no-store" });
      if (!res.ok) throw new Error(`GET /metrics answered ${res.status}`);
      const now = Date.now();
      history.push({ at: now, samples: parse(await res.text()) });
      while (history.length > 2 && now - history[0].at > KEEP_MS) history.shift();
      render();
    } catch (err) {
      const status = $("figures-status");
      status.textContent = "The figures are stale: " + (err.message || "the server cannot be reached");
      status.classList.add("error-text");
    }
  }

  cf.figures = { parse, quantile, bucketGains, gain };
  window.addEventListener("chatfleet:token", loadModels);
  loadModels().finally(scrape);
  setInterval(scrape, SCRAPE_MS);
})();
