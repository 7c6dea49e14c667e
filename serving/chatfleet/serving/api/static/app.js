// chatfleet dashboard: the page's shell. The token (from the link `chatfleet serve`
// prints, /#token=..., or the auth panel), HTTP with it, the banner and the views.
// The other scripts (sessions, figures, playground, tools) use what this one shares
// as `window.chatfleet` and hear of token changes through window events:
// chatfleet:token (a new token to use), chatfleet:unauthorized, chatfleet:forgotten.
// Plain JavaScript, no build step, no third-party code (it must work offline).
"use strict";

(() => {
  const TOKEN_KEY = "chatfleet.token";
  const REFRESH_KEY = "chatfleet.refresh_token";
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

  const state = { token: null, unauthorized: false };

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
    // sessions.js closes its event stream and shows the state.
    window.dispatchEvent(new Event("chatfleet:unauthorized"));
  }

  function authorized() {
    state.unauthorized = false;
    hideBanner();
  }

  function useNewToken() {
    authorized();
    $("auth-panel").hidden = true;
    // Each part of the page reconnects and reloads with the new token.
    window.dispatchEvent(new Event("chatfleet:token"));
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

  function wire() {
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => showView(tab.dataset.view));
    }
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
      showBanner("Token forgotten.", "info");
      window.dispatchEvent(new Event("chatfleet:forgotten"));
    });
  }

  // What the other scripts of the page share (they load after this one, deferred).
  window.chatfleet = {
    api,
    apiUrl,
    base,
    HttpError,
    showBanner,
    hideBanner,
    token: () => state.token,
    isUnauthorized: () => state.unauthorized,
    tryRefresh,
    unauthorized,
    authorized: () => {
      if (state.unauthorized) authorized();
    },
  };

  loadToken();
  showView(sessionStorage.getItem(VIEW_KEY));
  wire();
})();
