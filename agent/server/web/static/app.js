// edge-fleet dashboard: a little vanilla JavaScript, no framework. The pages work
// without it; it only asks before an action. Live updates (server-sent events) come next.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
