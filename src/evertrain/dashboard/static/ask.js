// "Ask the model": one prompt, two checkpoints' answers streamed side by side (POST /api/ask, server-sent
// events; dashboard/ask.py). Kept apart from app.js: it needs nothing of it but the page.
// #ask=PROMPT&a=base&b=12 in the address fills the box and asks once, so a question can be shared as a link.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("ask"), panes = [$("answer-a"), $("answer-b")];
  const part = (pane, name) => pane.querySelector("." + name);

  async function fillChoices() {
    const r = await fetch("/api/state", { cache: "no-store" });
    if (!r.ok) return;
    const { checkpoints } = await r.json();
    const choices = [["base", "base model"], ["newest", "newest checkpoint"],
      ...checkpoints.map((c) => [String(c.step), `${c.name}${c.pinned ? " (pinned)" : ""}`])];
    for (const select of [$("ask-a"), $("ask-b")]) {
      const want = select.value || select.dataset.want;
      select.replaceChildren(...choices.map(([value, text]) => Object.assign(document.createElement("option"),
        { value, textContent: text })));
      select.value = choices.some(([v]) => v === want) ? want : select.dataset.want;
    }
  }

  function show(event) {
    const pane = panes[event.side];
    if (event.type === "start") {
      part(pane, "who").textContent = event.label;
      pane.dataset.step = event.step ?? "base";
      pane.dataset.state = "answering";
    } else if (event.type === "token") {
      part(pane, "text").textContent += event.text;
    } else if (event.type === "done") {
      pane.dataset.state = "done";
    } else if (event.type === "error") {
      pane.dataset.state = "error";
      part(pane, "who").textContent = event.message;
    }
  }

  async function ask(e) {
    if (e) e.preventDefault();
    for (const pane of panes) {
      part(pane, "text").textContent = "";
      part(pane, "who").textContent = "waiting…";
      pane.dataset.state = "waiting";
    }
    $("ask-go").disabled = true;
    $("ask-error").hidden = true;
    try {
      const r = await fetch("/api/ask", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: $("ask-prompt").value, a: $("ask-a").value, b: $("ask-b").value }) });
      if (!r.ok) {
        const body = await r.json().catch(() => ({}));
        throw new Error(`${r.status} ${body.error || r.statusText}`);
      }
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {  // an event may arrive in pieces
          const line = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (line.startsWith("data: ")) show(JSON.parse(line.slice(6)));
        }
      }
    } catch (err) {
      $("ask-error").textContent = `Cannot ask: ${err.message}`;
      $("ask-error").hidden = false;
    } finally {
      $("ask-go").disabled = false;
      form.dataset.asked = String(Number(form.dataset.asked || 0) + 1);
    }
  }

  form.addEventListener("submit", ask);
  for (const select of [$("ask-a"), $("ask-b")]) select.addEventListener("focus", fillChoices);
  const hash = new URLSearchParams(location.hash.slice(1));
  $("ask-a").dataset.want = hash.get("a") || "base";
  $("ask-b").dataset.want = hash.get("b") || "newest";
  fillChoices().then(() => {
    if (hash.get("ask")) {
      $("ask-prompt").value = hash.get("ask");
      ask();
    }
  });
})();
