// edge-fleet dashboard: a little vanilla JavaScript, no framework. The pages work
// without it; it asks before an action and keeps a page live: a page whose <main> has
// data-live="VIEW" listens to /ui/live?view=VIEW (server-sent events) and, on
// "changed", fetches itself again and swaps the elements marked data-live-part (by id)
// in place — never one holding the focused element (a form being filled in). It fetches
// main's data-live-url when the page has one: a page drawn as the answer to a form
// (a command's reply, a refused deploy) sits at the form's POST address.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

(() => {
  const main = document.querySelector("main[data-live]");
  const badge = document.getElementById("live-state");
  if (!main || !badge || !window.EventSource || !window.fetch || !window.DOMParser) {
    return;
  }
  const GAP_MS = 3000; // at most one refresh this often
  const REOPEN_MS = 30000; // after the server refused the stream (busy, restarting)
  const MAX_REOPEN = 20; // then the page stays as it is: the reload link still works
  let source = null;
  let timer = null;
  let last = 0;
  let reopened = 0;

  function show(state, text) {
    badge.hidden = false;
    badge.dataset.state = state;
    badge.textContent = text;
  }

  function planRefresh() {
    if (timer !== null) {
      return; // one is planned: it fetches the newest page anyway
    }
    timer = window.setTimeout(refresh, Math.max(0, last + GAP_MS - Date.now()));
  }

  async function refresh() {
    timer = null;
    last = Date.now();
    let response;
    try {
      const url = main.dataset.liveUrl || window.location.href;
      response = await fetch(url, { credentials: "same-origin" });
    } catch (error) {
      show("off", "reconnecting…");
      return;
    }
    if (response.redirected && new URL(response.url).pathname === "/ui/login") {
      window.location.assign(response.url); // signed out meanwhile
      return;
    }
    if (!response.ok) {
      return; // e.g. the database away (503): keep what is shown; the next change retries
    }
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const part of document.querySelectorAll("[data-live-part]")) {
      const next = part.id ? fresh.getElementById(part.id) : null;
      if (next && !part.contains(document.activeElement)) {
        part.replaceWith(document.importNode(next, true));
      }
    }
    document.dispatchEvent(new CustomEvent("live:refreshed"));
  }

  function open() {
    const url = "/ui/live?view=" + encodeURIComponent(main.dataset.live);
    source = new EventSource(url);
    source.addEventListener("ready", () => {
      reopened = 0;
      show("on", "live");
    });
    source.addEventListener("changed", planRefresh);
    source.addEventListener("ended", () => {
      source.close();
      window.location.assign("/ui/login"); // the session ended (logout, revoked, expired)
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // refused (429, 503, 401): EventSource gives up; try again later, a few times
        show("off", "not live · reload");
        if (reopened < MAX_REOPEN) {
          reopened += 1;
          window.setTimeout(open, REOPEN_MS);
        }
      } else {
        show("off", "reconnecting…"); // EventSource reconnects by itself
      }
    });
  }

  window.addEventListener("pagehide", () => source && source.close());
  open();
})();
