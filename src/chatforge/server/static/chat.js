// chatforge workbench: chat with any served model (or named model, or adapter), tune every
// sampling knob of the CLI, compare models and settings side by side, and keep judgements
// (thumbs, edits, the better of two replies) in the server's conversation log.
// One column = one model + its settings; two or more columns = compare mode: each prompt
// goes to every column, the replies stream side by side, and the conversation goes on
// with the reply picked (the first one until a pick). Model text is only ever rendered
// by Markdown.render (text nodes), never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const SAMPLING = JSON.parse($("sampling").textContent);  // {default, presets, max_tokens}
// Knob id -> [request field, the value that switches it off (where a preset leaves it)].
const KNOBS = {
  "temperature": ["temperature", 1.0], "top-p": ["top_p", 1.0], "top-k": ["top_k", 0],
  "min-p": ["min_p", 0.0], "repetition-penalty": ["repetition_penalty", 1.0],
  "no-repeat-ngram": ["no_repeat_ngram_size", 0], "presence-penalty": ["presence_penalty", 0.0],
  "frequency-penalty": ["frequency_penalty", 0.0],
};
const INTEGER = new Set(["top_k", "no_repeat_ngram_size", "max_tokens", "seed"]);

// --- what the browser keeps (localStorage): key, columns, conversations -----------------
const load = (key, fallback) => {
  try {
    const v = localStorage.getItem("chatforge-" + key);
    return v === null ? fallback : JSON.parse(v);
  }
  catch { return fallback; }
};
const keep = (key, value) => {
  try { localStorage.setItem("chatforge-" + key, JSON.stringify(value)); return true; }
  catch { return false; }  // storage full
};

function presetSettings(name) {
  const preset = SAMPLING.presets[name] || {};
  const s = {preset: name};
  for (const [field, off] of Object.values(KNOBS)) s[field] = field in preset ? preset[field] : off;
  return s;
}
const freshColumn = () => ({model: null, ...presetSettings(SAMPLING.default),
                            max_tokens: SAMPLING.max_tokens, seed: null, stop: []});

// (Columns saved by an older page get the fields it lacked.)
let columns = (load("columns", null) || [{}]).map((c) => ({...freshColumn(), ...c}));
let active = 0;                           // the column the settings panel edits
let conversations = load("conversations", []);  // newest first
let conv = conversations.find((c) => c.id === load("current", null)) || newConversation("");
let served = [];                          // cards from /v1/models
let controller = null;                    // aborts the replies being streamed
const letter = (i) => String.fromCharCode(65 + i);

function newConversation(system) {  // a new chat keeps the system prompt being tuned
  return {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "",
          system, turns: []};
}
function saveConversations() {
  if (conv.turns.length && !conversations.includes(conv)) conversations.unshift(conv);
  // Full storage: forget the oldest conversations (the server's log keeps them all).
  while (!keep("conversations", conversations) && conversations.length > 1) conversations.pop();
  keep("current", conv.id);
  drawConversations();
}

// --- the settings panel edits columns[active] -------------------------------------------
function drawSettings() {
  const c = columns[active];
  $("model").value = c.model || "";
  $("preset").value = c.preset;
  for (const [id, [field]] of Object.entries(KNOBS)) $(id).value = c[field];
  $("max-tokens").value = c.max_tokens;
  $("seed").value = c.seed === null ? "" : c.seed;
  $("stop").value = c.stop.map((s) => s.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")).join("\n");
  drawTabs();
}
function readSettings() {
  const c = columns[active];
  const number = (id, field) => {
    const v = INTEGER.has(field) ? parseInt($(id).value, 10) : parseFloat($(id).value);
    return Number.isFinite(v) ? v : null;
  };
  c.model = $("model").value || c.model;
  for (const [id, [field, off]] of Object.entries(KNOBS)) {
    const v = number(id, field);
    c[field] = v === null ? off : v;  // an emptied box: the knob off
  }
  c.max_tokens = number("max-tokens", "max_tokens") || SAMPLING.max_tokens;
  c.seed = number("seed", "seed");
  c.stop = $("stop").value.split("\n").filter((s) => s)
    .map((s) => s.replace(/\\(n|t|\\)/g, (_, e) => ({n: "\n", t: "\t", "\\": "\\"})[e]));
  keep("columns", columns);
  drawTabs();
}
// What a column sends besides model and messages (also its "settings" in feedback).
function requestSettings(c) {
  const s = {max_tokens: c.max_tokens};
  for (const [field] of Object.values(KNOBS)) s[field] = c[field];
  if (c.seed !== null) s.seed = c.seed;
  if (c.stop.length) s.stop = c.stop;
  return s;
}
// "balanced, temperature 0.8": the preset and what differs from it.
function describe(c) {
  const base = {...presetSettings(c.preset), max_tokens: SAMPLING.max_tokens, seed: null};
  const diff = Object.entries(requestSettings(c)).filter(([k, v]) => k !== "stop" && base[k] !== v);
  const words = [c.preset, ...diff.map(([k, v]) => k.replace(/_/g, " ") + " " + v)];
  if (c.stop.length) words.push("stop " + JSON.stringify(c.stop));
  return words.join(", ");
}
function drawTabs() {
  const tabs = columns.map((c, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = i === active ? "active" : "";
    b.setAttribute("role", "tab");
    b.setAttribute("aria-selected", String(i === active));
    b.textContent = letter(i) + ": " + (c.model || "?");
    b.title = describe(c);
    b.addEventListener("click", () => { active = i; drawSettings(); });
    return b;
  });
  $("tabs").replaceChildren(...tabs);
  $("remove-column").disabled = columns.length < 2;
}
function fillModels() {
  $("model").replaceChildren(...served.map((m) => {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.id + (m.parent ? " (adapter on " + m.parent + ")" : "");
    return o;
  }));
  for (const c of columns) {  // a model no longer served: the default one
    if (!served.some((m) => m.id === c.model)) c.model = served.length ? served[0].id : null;
  }
  drawSettings();
}

// --- talking to the server ------------------------------------------------------------
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}
async function failure(r) {
  const body = await r.json().catch(() => ({}));
  const message = body.error ? body.error.message : r.status + " " + r.statusText;
  if (r.status === 401) {
    return "This server needs an API key: enter it in the sidebar. (" + message + ")";
  }
  return message;
}
let retryTimer = null;
async function loadModels() {
  clearTimeout(retryTimer);
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    if (!r.ok) throw Object.assign(new Error(await failure(r)), {status: r.status});
    served = (await r.json()).data;
    $("status").textContent = "ready: " + served.length + " model" + (served.length > 1 ? "s" : "");
    $("status").className = "";
    fillModels();
  } catch (e) {
    $("status").textContent = e.message;
    $("status").className = e.status === 503 ? "" : "error";  // 503: a model is loading
    if (e.status !== 401) retryTimer = setTimeout(loadModels, 2000);
  }
}
// Server-sent events of a streamed reply, one parsed chunk at a time.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  }
}
async function stream(reply, messages, card) {
  const body = {model: reply.model, messages, stream: true, stream_options: {include_usage: true},
                ...reply.settings};
  const t0 = performance.now();
  let first = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) throw new Error(await failure(r));
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      reply.response_id = reply.response_id || chunk.id || null;
      if (chunk.usage) reply.usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          if (first === null) first = performance.now();
          reply.chunks = (reply.chunks || 0) + 1;
          reply.content += c.delta.content;
          card.draw();
        }
        if (c.finish_reason) reply.finish = c.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.finish = "stopped";
    else reply.error = e.message;
  }
  const end = performance.now();
  // The server's count; a stopped reply has none: its chunks then (about a token each).
  const tokens = reply.usage ? reply.usage.completion_tokens : reply.chunks || 0;
  reply.seconds = (end - t0) / 1000;
  reply.ttft_ms = first === null ? null : Math.round(first - t0);
  // The decode rate: the tokens after the first over the time after it.
  reply.tps = tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
  card.draw(true);
}
async function feedback(turn, kind, index, note, extra = {}) {
  const pack = (r) => ({model: r.model, settings: r.settings, content: r.content,
                        response_id: r.response_id || null, usage: r.usage || null});
  // A pick compares the replies that came (a column that failed has nothing to judge).
  const judged = kind === "pick" ? turn.replies.filter(usable) : [turn.replies[index]];
  const chosen = judged.indexOf(turn.replies[index]);
  if (kind === "pick" && judged.length < 2) kind = "good";
  const body = {kind, messages: turn.messages, replies: judged.map(pack), source: "web", ...extra};
  if (kind === "pick") body.chosen = chosen;
  note.className = "note";
  note.textContent = "saving...";
  try {
    const r = await fetch("/v1/feedback",
                          {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!r.ok) throw new Error(await failure(r));
    const saved = await r.json();
    note.textContent = "saved to the log (#" + saved.id + ")";
    return true;
  } catch (e) {
    note.className = "note error";
    note.textContent = "not saved: " + e.message;
    return false;
  }
}

// --- the conversation ----------------------------------------------------------------
const text = (r) => (r.edited !== undefined ? r.edited : r.content);
const usable = (r) => r && !r.error && text(r);
// The messages a new prompt follows: each earlier turn with its picked (else first) reply.
function history() {
  const out = conv.system.trim() ? [{role: "system", content: conv.system.trim()}] : [];
  for (const t of conv.turns) {
    const reply = usable(t.replies[t.chosen]) ? t.replies[t.chosen] : t.replies.find(usable);
    if (reply) out.push({role: "user", content: t.user}, {role: "assistant", content: text(reply)});
  }
  return out;
}
function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}
function div(className, parent) {
  const d = document.createElement("div");
  d.className = className;
  if (parent) parent.appendChild(d);
  return d;
}
function drawTurn(turn) {
  const view = div("turn", $("log"));
  div("user", view).textContent = turn.user;
  const row = div("replies", view);
  const cards = turn.replies.map((reply, i) => {
    const card = div("reply", row);
    const head = div("head", card);
    const column = turn.replies.length > 1 ? reply.column + " · " : "";
    head.textContent = column + reply.model + " · " + reply.describe;
    const content = div("content", card), meta = div("meta", card), actions = div("actions", card);
    let pending = false;
    card.draw = (final) => {
      if (!final) {  // streaming: redraw once per frame at most
        if (!pending) requestAnimationFrame(() => { pending = false; card.draw(true); });
        pending = true;
        return;
      }
      const log = $("log");
      const following = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      content.replaceChildren(Markdown.render(text(reply)));
      if (following) log.scrollTop = log.scrollHeight;  // keep up with the stream
      if (reply.error) div("error", content).textContent = reply.error;
      card.classList.toggle("chosen", turn.chosen === i && turn.replies.length > 1);
      if (reply.seconds === undefined) return;
      const tokens = reply.usage ? reply.usage.completion_tokens
        : reply.chunks ? "~" + reply.chunks : null;
      meta.textContent = [tokens === null ? null : tokens + " tokens",
        reply.tps === null ? null : reply.tps.toFixed(1) + " tok/s",
        reply.ttft_ms === null ? null : "first token " + reply.ttft_ms + " ms",
        reply.seconds.toFixed(1) + " s",
        {length: "cut at max tokens", stopped: "stopped"}[reply.finish] || null,
        reply.edited !== undefined ? "edited" : null].filter((x) => x !== null).join(" · ");
      const usage = reply.usage || {};
      const cached = (usage.prompt_tokens_details || {}).cached_tokens;
      meta.title = usage.prompt_tokens === undefined ? "" : "prompt: " + usage.prompt_tokens +
        " tokens" + (cached ? " (" + cached + " from the prefix cache)" : "");
      card.classList.add("done");
    };
    card.actions = () => {  // once every column has finished
      if (!usable(reply)) return;  // a failed or empty reply: nothing to judge
      const note = document.createElement("span");
      note.className = "note";
      if (turn.replies.length > 1) {
        const why = "The better reply: kept in the conversation log, and the chat goes on from it";
        actions.append(button("Pick " + reply.column, why, () => {
          turn.chosen = i;
          cards.forEach((c) => c.draw(true));
          saveConversations();
          feedback(turn, "pick", i, note);
        }));
      } else {
        const log = " (kept in the conversation log)";
        actions.append(
          button("👍", "A good reply" + log, () => feedback(turn, "good", i, note)),
          button("👎", "A bad reply" + log, () => feedback(turn, "bad", i, note)),
          button("Edit", "Write the reply it should have given" + log + "; the chat goes on",
                 () => edit(reply, turn, i, card, note)));
      }
      actions.append(note);
    };
    return card;
  });
  $("log").scrollTop = $("log").scrollHeight;
  return cards;
}
function edit(reply, turn, i, card, note) {
  const content = card.querySelector(".content");
  const area = document.createElement("textarea");
  area.value = text(reply);
  const save = button("Save", "Keep this text as the reply", () => {
    if (!area.value.trim()) return;
    reply.edited = area.value;
    card.draw(true);
    saveConversations();
    feedback(turn, "edit", i, note, {edited: area.value});
  });
  content.replaceChildren(area, save, button("Cancel", "", () => card.draw(true)));
  area.focus();
}
function drawLog() {
  $("log").replaceChildren();
  $("system").value = conv.system;
  for (const turn of conv.turns) {
    const cards = drawTurn(turn);
    for (const card of cards) { card.draw(true); card.actions(); }
    cards[0].parentNode.parentNode.classList.add("done");
  }
  drawConversations();
}
function drawConversations() {
  $("conversations").replaceChildren(...conversations.map((c) => {
    const li = document.createElement("li");
    li.className = c === conv ? "current" : "";
    const title = document.createElement("span");
    title.textContent = c.title || "(untitled)";
    title.addEventListener("click", () => {
      if (controller) return;  // not while replies stream into the open one
      conv = c;
      keep("current", c.id);
      drawLog();
    });
    li.append(title, button("×", "Delete this conversation (from this browser)", () => {
      conversations = conversations.filter((x) => x !== c);
      if (c === conv) conv = newConversation(conv.system);
      saveConversations();
      drawLog();
    }));
    return li;
  }));
}
async function send(prompt) {
  readSettings();
  const messages = [...history(), {role: "user", content: prompt}];
  const replies = columns.map((c, i) => ({column: letter(i), model: c.model, describe: describe(c),
                                          settings: requestSettings(c), content: ""}));
  const turn = {user: prompt, messages, replies, chosen: null};
  conv.title = conv.title || prompt.slice(0, 60);
  conv.turns.push(turn);
  saveConversations();
  const cards = drawTurn(turn);
  controller = new AbortController();
  busy(true);
  await Promise.all(turn.replies.map((reply, i) => stream(reply, messages, cards[i])));
  controller = null;
  busy(false);
  cards.forEach((card) => card.actions());
  cards[0].parentNode.parentNode.classList.add("done");  // the turn: every column finished
  saveConversations();
  $("log").scrollTop = $("log").scrollHeight;
}
function busy(on) {
  $("send").disabled = $("retry").disabled = on;
  $("stop-reply").disabled = !on;
}

// --- wiring -------------------------------------------------------------------------
for (const name of Object.keys(SAMPLING.presets)) {
  const o = document.createElement("option");
  o.value = o.textContent = name;
  $("preset").appendChild(o);
}
$("preset").addEventListener("change", () => {
  Object.assign(columns[active], presetSettings($("preset").value));
  keep("columns", columns);
  drawSettings();
});
for (const id of [...Object.keys(KNOBS), "model", "max-tokens", "seed", "stop"]) {
  $(id).addEventListener("input", readSettings);
  $(id).addEventListener("change", readSettings);
}
$("add-column").addEventListener("click", () => {
  readSettings();
  columns.push({...columns[active], stop: [...columns[active].stop]});
  active = columns.length - 1;
  keep("columns", columns);
  drawSettings();
});
$("remove-column").addEventListener("click", () => {
  if (columns.length < 2) return;
  columns.splice(active, 1);
  active = Math.min(active, columns.length - 1);
  keep("columns", columns);
  drawSettings();
});
$("api-key").value = localStorage.getItem("chatforge-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("chatforge-api-key", $("api-key").value.trim());
  loadModels();
});
$("system").addEventListener("input", () => {
  conv.system = $("system").value;
  saveConversations();
});
$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const prompt = $("input").value;
  if (!prompt.trim() || controller || !served.length) return;
  $("input").value = "";
  send(prompt);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop-reply").addEventListener("click", () => { if (controller) controller.abort(); });
$("retry").addEventListener("click", () => {
  const last = conv.turns[conv.turns.length - 1];
  if (!last || controller || !served.length) return;
  conv.turns.pop();
  drawLog();
  send(last.user);
});
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conv = newConversation(conv.system);
  keep("current", null);
  drawLog();
});
drawSettings();
drawLog();
loadModels();
