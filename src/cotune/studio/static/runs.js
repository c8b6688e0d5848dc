// The Runs page (curves from metrics.jsonl, several runs overlaid, the resolved config) and the
// Answers page (eval predictions side by side, the metrics table, pictures eval wrote).
"use strict";
const COLOURS = ["#2f5dd0", "#d0452f", "#1b7f3b", "#9a4fd0", "#c78a00", "#00838f"];

// One SVG line chart: series = [{name, colour, points: [[x, y], ...]}].
function lineChart(title, series) {
  const W = 420, H = 220, L = 52, R = 10, T = 10, B = 28, NS = "http://www.w3.org/2000/svg";
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "curve");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafbfd", stroke: "#d9dee7" });
  for (let k = 0; k <= 4; k++) {
    const y = y0 + ((y1 - y0) * k) / 4, x = x0 + ((x1 - x0) * k) / 4;
    add("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eceff4" });
    add("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 10, fill: "#667085" }, Number(y.toPrecision(3)));
    add("text", { x: sx(x), y: H - 10, "text-anchor": "middle", "font-size": 10, fill: "#667085" }, Math.round(x));
  }
  for (const s of series) {
    const pts = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    add("polyline", { points: pts, fill: "none", stroke: s.colour, "stroke-width": 1.6, "data-run": s.name });
    if (s.points.length < 40) for (const p of s.points) add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.4, fill: s.colour });
  }
  return el("div", { class: "chart", "data-metric": title }, el("h3", {}, title), svg,
    el("div", { class: "legend" }, series.map((s) => el("span", {}, el("i", { style: `background:${s.colour}` }), s.name))));
}

// Training loss, validation loss, validation loss per stage, then every other numeric eval_* key
// (task metrics such as eval_accuracy), then the rest (lr, grad norm, tokens/s).
function metricOrder(keys) {
  const first = ["loss", "eval_loss", "eval_loss_summary", "eval_loss_caption", "eval_loss_reasoning", "eval_loss_conclusion", "eval_loss_other"];
  const evals = keys.filter((k) => k.startsWith("eval_") && !first.includes(k)).sort();
  const rest = keys.filter((k) => !first.includes(k) && !k.startsWith("eval_")).sort();
  return [...first.filter((k) => keys.includes(k)), ...evals, ...rest];
}

Studio.runsShown = null;
Studio.pages.runs = async function (root) {
  const runs = await api("/api/runs");
  if (!runs.length) { fill(root, el("p", {}, "No runs: start with --run RUN_DIR.")); return; }
  if (!Studio.runsShown) Studio.runsShown = runs.map(() => true);
  const shown = runs.map((r, k) => ({ ...r, colour: COLOURS[k % COLOURS.length] })).filter((r, k) => Studio.runsShown[k]);
  const keys = metricOrder([...new Set(shown.flatMap((r) => Object.keys(r.curves)))]);
  const charts = keys.map((key) => lineChart(key,
    shown.filter((r) => r.curves[key]).map((r) => ({ name: r.name, colour: r.colour, points: r.curves[key] }))));
  const pick = el("div", { class: "bar" }, runs.map((r, k) => el("label", {},
    el("input", { type: "checkbox", checked: Studio.runsShown[k], onchange: (e) => { Studio.runsShown[k] = e.target.checked; Studio.pages.runs(root); } }),
    " " + r.name)));
  fill(root, el("h2", {}, "Runs"), pick, el("div", { class: "charts" }, charts),
    shown.map((r) => el("details", { class: "config" }, el("summary", {}, `${r.name}: config.yaml (${r.path})`), el("pre", {}, r.config || "(none)"))));
};

// eval.md's tables as HTML tables; other lines as text.
function markdownTables(text) {
  const out = [];
  let rows = [];
  const flush = () => {
    if (!rows.length) return;
    const cells = rows.filter((r) => !/^\|[-:| ]+\|$/.test(r)).map((r) => r.slice(1, -1).split("|").map((c) => c.trim()));
    out.push(el("table", { class: "metrics" }, cells.map((row, k) => el("tr", {}, row.map((c) => el(k ? "td" : "th", {}, c))))));
    rows = [];
  };
  for (const line of text.split("\n")) {
    if (line.trim().startsWith("|")) rows.push(line.trim());
    else { flush(); if (line.trim()) out.push(el("div", { class: "muted" }, line.replace(/^#+ /, ""))); }
  }
  flush();
  return out;
}

Studio.answersState = { run: 0, folder: 0, wrong: false, unchanged: false, text: "" };
Studio.pages.answers = async function (root) {
  const runs = await api("/api/runs");
  const withEval = runs.map((r, k) => ({ ...r, k })).filter((r) => r.evals.length);
  if (!withEval.length) { fill(root, el("p", {}, "No eval output in the runs (cotune eval writes RUN/eval/predictions.jsonl).")); return; }
  const s = Studio.answersState;
  const run = withEval[Math.min(s.run, withEval.length - 1)];
  const folder = run.evals[Math.min(s.folder, run.evals.length - 1)];
  const a = await api(`/api/answers/${run.k}?folder=${encodeURIComponent(folder)}`);
  const ablation = a.rows.some((r) => Object.values(r.by_model).some((m) => m.unchanged_when_shuffled !== undefined));
  let rows = a.rows;
  if (s.wrong) rows = rows.filter((r) => Object.values(r.by_model).some((m) => m.correct === false));
  if (s.unchanged) rows = rows.filter((r) => Object.values(r.by_model).some((m) => m.unchanged_when_shuffled));
  if (s.text) rows = rows.filter((r) => JSON.stringify(r).toLowerCase().includes(s.text.toLowerCase()));
  const again = () => Studio.pages.answers(root);
  const bar = el("div", { class: "bar" },
    chooser("run", withEval.map((r) => r.name), withEval.indexOf(run), (k) => { s.run = k; s.folder = 0; again(); }),
    chooser("eval", run.evals, run.evals.indexOf(folder), (k) => { s.folder = k; again(); }),
    el("label", {}, el("input", { type: "checkbox", id: "filter-wrong", checked: s.wrong, onchange: (e) => { s.wrong = e.target.checked; again(); } }), " wrong answers"),
    el("label", { title: ablation ? "" : "this eval has no replies with shuffled pictures (cotune eval --image_ablation)" },
      el("input", { type: "checkbox", id: "filter-unchanged", checked: s.unchanged, disabled: !ablation, onchange: (e) => { s.unchanged = e.target.checked; again(); } }),
      " unchanged when the picture is shuffled"),
    el("label", {}, "text ", el("input", { type: "text", value: s.text, onchange: (e) => { s.text = e.target.value; again(); } })));
  const cards = rows.slice(0, 100).map((r) => el("div", { class: "card answer" },
    el("div", { class: "head" }, el("span", {}, "id " + r.id), el("span", {}, "reference: ", el("b", {}, r.gold ?? "-"))),
    el("div", { class: "pictures" }, (r.images.length ? r.images : [null]).map((u) => picture(u))),
    el("div", {}, r.question ? el("p", {}, r.question) : null, el("div", { class: "models" }, a.models.map((name) => {
      const m = r.by_model[name];
      if (!m) return el("div", { class: "model" }, el("h4", {}, name), "-");
      const verdict = m.correct === true ? el("span", { class: "ok verdict" }, "right") : m.correct === false ? el("span", { class: "bad verdict" }, "wrong") : el("span", { class: "muted" }, "not scored");
      return el("div", { class: "model", "data-model": name }, el("h4", {}, name, " ", verdict),
        el("div", {}, el("b", {}, "conclusion: "), m.stages.CONCLUSION ?? "(none)"),
        m.reply_shuffled !== undefined ? el("div", { class: m.unchanged_when_shuffled ? "warning" : "muted" },
          (m.unchanged_when_shuffled ? "same answer with a shuffled picture: " : "with a shuffled picture: ") +
          (m.reply_shuffled.match(/<CONCLUSION>([\s\S]*?)<\/CONCLUSION>/) || [null, m.reply_shuffled])[1].trim()) : null,
        el("details", {}, el("summary", {}, "reply"), stagesView(m.stages, m.reply)));
    })))));
  fill(root, el("h2", {}, "Answers"), bar,
    el("details", { class: "eval-tables" }, el("summary", {}, "eval.md: the metrics, per model" + (a.pictures.length ? " (and the pictures eval wrote)" : "")),
      markdownTables(a.table), el("div", { class: "thumbs" }, a.pictures.map((u) => el("img", { src: u, class: "eval-picture", style: "width:auto;height:260px" })))),
    el("p", { class: "muted" }, `${rows.length} of ${a.rows.length} samples` + (rows.length > 100 ? " (first 100 shown)" : "")), cards);
};
