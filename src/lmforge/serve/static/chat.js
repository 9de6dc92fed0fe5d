// lmforge chat page: streams /v1/chat/completions (server-sent events) into the page; the RAG toggle asks
// /ui/rag for the cited-sources prompt first. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, rag: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, s) {
  $("status").textContent = text;
  $("status").dataset.state = s;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

async function loadModels() {
  try {
    const models = await getJSON("/v1/models");
    const select = $("model");
    select.innerHTML = "";
    for (const m of models.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.parent ? m.id + " (adapter)" : m.id;
      select.appendChild(opt);
    }
    const cfg = await getJSON("/ui/config").catch(() => ({ rag: false }));
    $("rag").disabled = !cfg.rag;
    $("rag").title = cfg.rag ? "Answer from " + cfg.chunks + " indexed chunks, with cited sources"
                             : "no RAG index on this server";
    setStatus("ready", "ready");
  } catch (e) {
    setStatus("cannot list models: " + e.message + " (API key?)", "error");
  }
}

function showSources(bubble, sources, text) {
  if (!sources.length) return;
  const cited = new Set([...text.matchAll(/\[(\d+(?:\s*,\s*\d+)*)\]/g)]
    .flatMap((m) => m[1].split(",").map((n) => parseInt(n, 10))));
  const box = document.createElement("ol");
  box.className = "sources";
  for (const s of sources) {
    const li = document.createElement("li");
    li.className = cited.has(s.n) ? "cited" : "";
    li.textContent = s.citation;
    const snippet = document.createElement("span");
    snippet.className = "snippet";
    snippet.textContent = s.text.length > 160 ? s.text.slice(0, 160) + "…" : s.text;
    li.appendChild(snippet);
    box.appendChild(li);
  }
  bubble.appendChild(box);
}

// Reads an SSE body and calls onDelta(text) for each content delta; returns the finish reason.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return finish;
}

async function send(text) {
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.dataset.chunks = "0";
  $("send").disabled = true;
  $("stop").disabled = false;
  state.controller = new AbortController();
  let reply = "", sources = [];
  try {
    const system = $("system").value.trim();
    let messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history,
                    { role: "user", content: text }];
    if ($("rag").checked) {
      setStatus("retrieving…", "retrieving");
      const r = await fetch("/ui/rag", { method: "POST", headers: headers(), signal: state.controller.signal,
                                         body: JSON.stringify({ question: text, history: state.history }) });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error ? body.error.message : "HTTP " + r.status);
      messages = body.messages;
      sources = body.sources;
    }
    setStatus("generating…", "streaming");
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model: $("model").value, messages, stream: true,
        temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
        max_tokens: parseInt($("max-tokens").value, 10),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : "HTTP " + r.status);
    }
    const finish = await readStream(r, (delta) => {
      reply += delta;
      bubble.textContent = reply;
      bubble.dataset.chunks = String(parseInt(bubble.dataset.chunks, 10) + 1);
      bubble.scrollIntoView({ block: "end" });
    });
    showSources(bubble, sources, reply);
    state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    setStatus("done (" + (finish || "stopped") + ")", "done");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("stopped", "done");
      state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    } else {
      addMessage("error", e.message);
      setStatus("error", "error");
    }
  } finally {
    bubble.dataset.done = "1";
    $("send").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

for (const [id, out] of [["temperature", "temperature-value"], ["top-p", "top-p-value"],
                         ["max-tokens", "max-tokens-value"]]) {
  $(id).addEventListener("input", () => { $(out).textContent = $(id).value; });
}
$("api-key").value = localStorage.getItem("lmforge-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("lmforge-api-key", $("api-key").value);
  loadModels();
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  state.history = [];
  $("messages").innerHTML = "";
  setStatus("ready", "ready");
});
loadModels();
