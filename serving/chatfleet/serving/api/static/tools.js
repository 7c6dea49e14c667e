// Classify and compress, tried in the page: POST /api/classify and POST /api/compress
// with the page's token, their answers drawn (scores as bars, the compressed text
// with what it saved).
"use strict";

(() => {
  const cf = window.chatfleet;
  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function percent(x) {
    return `${(100 * x).toFixed(1)}%`;
  }

  function bar(share) {
    const outer = el("span", "bar");
    const inner = el("span");
    inner.style.width = `${Math.max(0, Math.min(1, share)) * 100}%`;
    outer.append(inner);
    return outer;
  }

  function showError(id, err) {
    $(id).hidden = false;
    $(id).textContent = err.status ? `${err.status}: ${err.message}` : err.message;
  }

  async function run(button, errorId, work) {
    $(errorId).hidden = true;
    $(button).disabled = true;
    try {
      await work();
    } catch (err) {
      showError(errorId, err);
    } finally {
      $(button).disabled = false;
    }
  }

  // ---- classify ---------------------------------------------------------------------

  function renderClassification(body) {
    $("cl-result").hidden = false;
    $("cl-category").textContent = body.category;
    $("cl-confidence").textContent = `confidence ${percent(body.confidence)}`;
    $("cl-result").dataset.category = body.category;
    const scores = body.labels.map((label, i) => {
      const li = el("li");
      li.dataset.label = label;
      li.dataset.score = String(body.scores[i]);
      li.classList.toggle("best", i === 0);
      li.append(el("span", "label", label), bar(body.scores[i]), el("span", "score", percent(body.scores[i])));
      return li;
    });
    $("cl-scores").replaceChildren(...scores);
    const nearest = [];
    for (const [label, examples] of Object.entries(body.nearest || {})) {
      if (!examples.length) continue;
      const ol = el("ol", "nearest-list");
      ol.dataset.label = label;
      for (const near of examples) {
        const li = el("li");
        li.append(el("q", "", near.example), el("span", "similarity", near.similarity.toFixed(2)));
        ol.append(li);
      }
      nearest.push(el("h5", "", `Nearest ${label} examples`), ol);
    }
    $("cl-nearest").replaceChildren(...nearest);
  }

  function classify(event) {
    event.preventDefault();
    const prompt = $("cl-prompt").value;
    const labels = $("cl-labels")
      .value.split(",")
      .map((label) => label.trim())
      .filter(Boolean);
    const body = { prompt };
    if (labels.length) body.possible_categories = labels;
    return run("cl-send", "cl-error", async () => {
      renderClassification(await cf.api("api/classify", { method: "POST", body: JSON.stringify(body) }));
    });
  }

  // ---- compress ---------------------------------------------------------------------

  function renderCompression(body) {
    $("cp-result").hidden = false;
    const saved = body.original_tokens - body.compressed_tokens;
    const result = $("cp-result");
    result.dataset.ratio = String(body.ratio);
    result.dataset.skipped = String(body.skipped);
    $("cp-summary").textContent = body.skipped
      ? `Unchanged: ${body.original_tokens} tokens is under the compressor's threshold.`
      : `${body.original_tokens} → ${body.compressed_tokens} tokens · ratio ${body.ratio.toFixed(2)}` +
        ` · saved ${saved} tokens (${percent(saved / body.original_tokens)})`;
    $("cp-meter").style.width = `${Math.min(1, body.ratio) * 100}%`;
    $("cp-output").textContent = body.compressed_text;
  }

  function compress(event) {
    event.preventDefault();
    const body = { text: $("cp-text").value, question: $("cp-question").value };
    const ratio = $("cp-ratio").value;
    if (ratio) body.ratio = Number(ratio);
    return run("cp-send", "cp-error", async () => {
      renderCompression(await cf.api("api/compress", { method: "POST", body: JSON.stringify(body) }));
    });
  }

  $("cl-form").addEventListener("submit", classify);
  $("cp-form").addEventListener("submit", compress);
})();
