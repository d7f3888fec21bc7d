// The chat page: sends the conversation to /v1/chat/completions with stream=true and shows the reply as
// its server-sent events arrive. Plain browser JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} of finished turns
let model = null;
let controller = null;    // the AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = "not connected";
    showError(await errorText(response));
    return;
  }
  model = (await response.json()).data[0].id;
  $("model").textContent = model;
  showError("");
}

function settings() {
  const body = { temperature: Number($("temperature").value), top_p: Number($("top_p").value) };
  if ($("max_tokens").value) body.max_tokens = Number($("max_tokens").value);
  if ($("seed").value) body.seed = Number($("seed").value);
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Calls onDelta(text) for every content delta of an SSE body; returns the last finish_reason seen.
async function readEvents(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

async function send(text) {
  if (model === null) await loadModel();
  if (model === null) return;
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(conversation);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  let reply = "";
  controller = new AbortController();
  setBusy(true);
  showError("");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, ...settings() }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const finish = await readEvents(response, (delta) => {
      reply += delta;
      bubble.textContent = reply;
      bubble.scrollIntoView({ block: "end" });
    });
    if (finish === "length") note(bubble, " [max tokens reached]");
  } catch (e) {
    if (e.name === "AbortError") note(bubble, " [stopped]");
    else showError(e.message);
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    setBusy(false);
    conversation.push({ role: "assistant", content: reply });
  }
}

function note(bubble, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  bubble.appendChild(span);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").textContent = "";
  showError("");
});
$("api_key").addEventListener("change", loadModel);
loadModel();
