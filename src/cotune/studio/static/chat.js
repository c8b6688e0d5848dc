// The Chat page: a picture (uploaded or picked from the data), a question, and the chosen adapters'
// replies side by side, streamed as they come.
"use strict";
Studio.chatState = { upload: null, image: null, preview: null, models: null };

async function readStream(response, onLine) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) { const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 1); if (line.trim()) onLine(JSON.parse(line)); }
  }
}

Studio.pages.chat = async function (root) {
  const s = Studio.chatState;
  const m = await api("/api/chat/models");
  if (!m.models.length) { fill(root, el("h2", {}, "Chat"), el("p", { class: "error" }, m.why || "no model")); return; }
  if (!s.models) s.models = m.models.slice(0, 4);
  let pictures = [];
  if (Studio.overview.data.length) {
    const d = await api("/api/data/0?limit=24");
    pictures = (d.records || []).filter((r) => !r.problems.length).flatMap((r) => r.images.slice(0, 1)).filter(Boolean);
  }
  const shown = el("div", { id: "chat-picture" }, s.preview ? el("img", { class: "picture", src: s.preview }) : el("span", { class: "muted" }, "no picture"));
  const setPicture = (preview, upload, image) => { s.preview = preview; s.upload = upload; s.image = image; fill(shown, el("img", { class: "picture", src: preview })); };
  const file = el("input", { type: "file", id: "chat-file", accept: "image/*", onchange: () => {
    const f = file.files[0]; if (!f) return;
    const reader = new FileReader();
    reader.onload = async () => {
      try { const u = await post("/api/chat/upload", { data: reader.result }); setPicture(reader.result, u.upload, null); status(`uploaded ${u.width}x${u.height}`); }
      catch (e) { status("upload refused: " + e.message); }
    };
    reader.readAsDataURL(f);
  } });
  const thumbs = el("div", { class: "thumbs" }, pictures.map((u) => el("img", { src: u + "?size=144", "data-src": u, class: s.image === u ? "chosen" : "",
    onclick: (e) => { for (const t of thumbs.children) t.classList.remove("chosen"); e.target.classList.add("chosen"); setPicture(u, null, u); } })));
  const question = el("input", { type: "text", id: "chat-question", size: 60, placeholder: "ask about the picture" });
  const search = el("select", { id: "chat-search" }, ["none", "stage", "best-of-n"].map((v) => el("option", { value: v }, v === "none" ? "greedy (streamed)" : `${v} search`)));
  const boxes = m.models.map((name) => el("label", {}, el("input", { type: "checkbox", value: name, checked: s.models.includes(name),
    onchange: (e) => { s.models = e.target.checked ? [...s.models, name] : s.models.filter((x) => x !== name); } }), " " + name));
  const columns = el("div", { class: "models", id: "chat-answers" });
  const ask = async () => {
    const chosen = m.models.filter((n) => s.models.includes(n));
    const cols = {};
    fill(columns, ...chosen.map((name) => {
      const text = el("pre", { class: "chat-text" });
      cols[name] = text;
      return el("div", { class: "model chat-col", "data-model": name }, el("h4", {}, name), text);
    }));
    const response = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question: question.value, models: chosen, search: search.value, upload: s.upload, image: s.image }) });
    if (!response.ok) { const b = await response.json().catch(() => ({})); fill(columns, el("p", { class: "error" }, b.detail || response.statusText)); return; }
    await readStream(response, (msg) => {
      const box = cols[msg.model];
      if (msg.piece) box.textContent += msg.piece;
      if (msg.error) { box.textContent = msg.error; box.classList.add("error"); box.dataset.done = "error"; }
      if (msg.done) { box.textContent = msg.text; box.dataset.done = "true"; }
    });
  };
  fill(root, el("h2", {}, "Chat"), el("p", { class: "muted" }, m.backend),
    el("div", { class: "bar" }, el("label", {}, "upload ", file), el("span", { class: "muted" }, "or pick one from the data:")), thumbs,
    el("div", { class: "card" }, shown, el("div", {},
      el("div", { class: "bar" }, question, search, el("button", { class: "primary", id: "chat-ask", onclick: ask }, "ask")),
      el("div", { class: "bar" }, boxes), columns)));
};
