// cotune studio: the page's core (no libraries, nothing fetched from elsewhere).
"use strict";
const Studio = { pages: {}, overview: null };
const STAGES = ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const why = body.detail || body.error || response.statusText;
    throw new Error(typeof why === "string" ? why : JSON.stringify(why));
  }
  return body;
}

function post(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function status(text) { document.getElementById("status").textContent = text; }

// The four stages of a LLaVA-CoT reply side by side; a reply without them as plain text.
function stagesView(stages, text) {
  const found = STAGES.filter((s) => stages && stages[s] !== undefined);
  if (!found.length) return el("div", { class: "plain" }, text || "");
  return el("div", { class: "stages" }, STAGES.map((s) =>
    el("div", { class: `stage stage-${s}`, "data-stage": s }, el("b", { text: s }), stages[s] === undefined ? "(missing)" : stages[s])));
}

function picture(url, cls) {
  return url ? el("img", { class: cls || "picture", src: url, alt: "picture" }) : el("div", { class: "muted" }, "(no picture)");
}

function chooser(label, items, current, onchange) {
  const select = el("select", { onchange: (e) => onchange(Number(e.target.value)) },
    items.map((name, k) => el("option", { value: k, selected: k === current }, name)));
  return el("label", {}, label + " ", select);
}

Studio.show = async function () {
  const name = (location.hash || "#data").slice(1).split("/")[0];
  const page = Studio.pages[name] ? name : "data";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  const root = document.getElementById("page");
  fill(root, el("p", { class: "muted" }, "loading..."));
  document.onkeydown = null;
  try {
    await Studio.pages[page](root);
  } catch (e) {
    fill(root, el("p", { class: "error" }, String(e.message || e)));
  }
  root.dataset.ready = page;
};

Studio.start = async function () {
  Studio.overview = await api("/api/overview");
  status(Studio.overview.chat ? `chat: ${Studio.overview.chat}` : "");
  window.addEventListener("hashchange", Studio.show);
  Studio.show();
};

// Replaces a node's children with the given nodes, arrays of them flattened.
function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}
