// The Data page: records with their pictures and stages, the check's problems, filters, augmentations.
"use strict";
Studio.dataState = { file: 0, answer: "", problem: "", text: "", offset: 0 };

function recordCard(k, r) {
  const card = el("div", { class: "card record", "data-index": r.index, "data-id": r.id },
    el("div", { class: "head" }, el("span", {}, r.where), el("span", {}, "id " + r.id),
      r.answer ? el("span", {}, "answer: ", el("b", {}, r.answer)) : null),
    el("div", { class: "pictures" }, r.images.map((u) => picture(u))),
    el("div", {},
      r.problems.map((p) => el("div", { class: "problem" }, "problem (training skips it): " + p)),
      r.warnings.map((p) => el("div", { class: "warning" }, "warning: " + p)),
      r.raw ? el("pre", {}, r.raw) : null,
      r.turns.map((t) => el("div", { class: "turn" }, el("div", { class: "role" }, t.role),
        t.stages ? stagesView(t.stages, t.text) : el("div", { class: "plain" }, t.text.replace("<image>", "").trim())))));
  if (r.images.length) {
    const aug = el("div", { class: "aug" });
    const button = el("button", { class: "augment", onclick: () => {
      fill(aug, ...[-1, 0, 1, 2, 3].map((e) => el("figure", {},
        el("img", { src: `/api/augment/${k}/${r.index}/${e}`, alt: "augmented" }),
        el("figcaption", {}, e < 0 ? "original" : `epoch ${e}`))));
    } }, "augmentations");
    card.append(el("div", { class: "aug" }, button), aug);
  }
  return card;
}

Studio.pages.data = async function (root) {
  const files = Studio.overview.data;
  if (!files.length) { fill(root, el("p", {}, "No data files: start with --data FILE.jsonl.")); return; }
  const s = Studio.dataState;
  const q = new URLSearchParams({ answer: s.answer, problem: s.problem, text: s.text, offset: s.offset, limit: 20 });
  const d = await api(`/api/data/${s.file}?${q}`);
  const reload = () => { s.offset = 0; Studio.pages.data(root); };
  const bar = el("div", { class: "bar" },
    chooser("file", files, s.file, (k) => { s.file = k; s.answer = ""; reload(); }),
    el("label", {}, "answer ", el("select", { id: "filter-answer", onchange: (e) => { s.answer = e.target.value; reload(); } },
      el("option", { value: "" }, "any"), (d.answers || []).map(([a, n]) => el("option", { value: a, selected: a === s.answer }, `${a} (${n})`)))),
    el("label", {}, "problem ", el("select", { id: "filter-problem", onchange: (e) => { s.problem = e.target.value; reload(); } },
      [["", "any"], ["problems", "skipped by training"], ["warnings", "with warnings"], ["clean", "clean"]].map(([v, t]) =>
        el("option", { value: v, selected: v === s.problem }, t)))),
    el("label", {}, "text ", el("input", { type: "text", id: "filter-text", value: s.text,
      onchange: (e) => { s.text = e.target.value; reload(); } })));
  const head = d.error ? el("p", { class: "error" }, d.error) :
    el("p", { class: "muted" }, `${d.path}: ${d.total} records (${d.format}), ${d.with_problems} skipped by training, ` +
      `${d.with_warnings} with warnings; ${d.matched} match; augmentation preview with the run's data.augment settings.`,
      (d.file_warnings || []).map((w) => el("div", { class: "warning" }, w)));
  const pager = el("div", { class: "bar" },
    el("button", { onclick: () => { s.offset = Math.max(0, s.offset - 20); Studio.pages.data(root); }, disabled: s.offset === 0 }, "previous"),
    el("span", { class: "muted" }, `${d.matched ? s.offset + 1 : 0}-${Math.min(s.offset + 20, d.matched)} of ${d.matched}`),
    el("button", { onclick: () => { s.offset += 20; Studio.pages.data(root); }, disabled: s.offset + 20 >= d.matched }, "next"));
  fill(root, el("h2", {}, "Data"), bar, head, pager, d.records.map((r) => recordCard(s.file, r)));
};
