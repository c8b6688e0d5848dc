// The Review page: a (accept), r (reject), e (edit, then Ctrl+Enter saves), j / k (next / previous).
"use strict";
Studio.reviewState = { queue: 0, at: null };

Studio.pages.review = async function (root) {
  const queues = Studio.overview.queues;
  if (!queues.length) { fill(root, el("p", {}, "No review queue: give --data OUT.jsonl (cotune data reason's output or any JSONL).")); return; }
  const s = Studio.reviewState;
  const q = await api(`/api/review/${s.queue}`);
  if (s.at === null) {  // resume at the first undecided item
    const first = q.items.findIndex((i) => !i.decision);
    s.at = first < 0 ? 0 : first;
  }
  s.at = Math.max(0, Math.min(s.at, q.items.length - 1));
  let editing = false;
  const item = q.items[s.at];
  const render = () => {
    const d = item.decision;
    const editBox = el("textarea", { class: "edit", id: "edit-reply" }, d && d.reply ? d.reply : item.reply);
    const teacher = item.teacher ? el("div", { class: item.teacher.accepted ? "ok" : "bad" },
      `teacher ${item.teacher.teacher || ""}, attempt ${item.teacher.attempt}${item.teacher.hinted ? " (hinted)" : ""}: ` +
      (item.teacher.accepted ? "accepted" : "rejected") + (item.teacher.why ? ` (${item.teacher.why})` : "")) : null;
    const stages = {};
    for (const st of STAGES) { const m = (d && d.reply ? d.reply : item.reply).match(new RegExp(`<${st}>([\\s\\S]*?)</${st}>`)); if (m) stages[st] = m[1].trim(); }
    const card = el("div", { class: "card review-item" + (d ? ` decision-${d.decision}` : ""), id: "review-item", "data-key": item.key },
      el("div", { class: "head" }, el("span", {}, `${s.at + 1} of ${q.items.length}`), el("span", {}, "id " + item.id),
        item.answer != null ? el("span", {}, "answer: ", el("b", {}, String(item.answer))) : null,
        el("span", { id: "decision" }, d ? `decided: ${d.decision}` : "undecided")),
      el("div", { class: "pictures" }, picture(item.image_url)),
      el("div", {}, el("p", {}, item.question.replace("<image>", "").trim()), teacher,
        editing ? el("div", {}, editBox, el("div", { class: "keys" }, "Ctrl+Enter saves the edit, Esc cancels")) : stagesView(stages, d && d.reply ? d.reply : item.reply)));
    const buttons = el("div", { class: "bar" },
      el("button", { onclick: () => decide("accept") }, "accept (a)"), el("button", { onclick: () => decide("reject") }, "reject (r)"),
      el("button", { onclick: () => { editing = true; render(); } }, "edit (e)"), el("button", { onclick: () => decide("undo") }, "undo (u)"),
      el("button", { onclick: () => move(-1) }, "previous (k)"), el("button", { onclick: () => move(1) }, "next (j)"));
    const counts = el("p", { class: "muted", id: "review-counts" }, `${q.decided} of ${q.total} decided: ` +
      Object.entries(q.counts).map(([k, v]) => `${v} ${k}`).join(", ") + `. Saved as you go: ${q.outputs.reviewed}, ${q.outputs.pairs}.`);
    fill(root, el("h2", {}, "Review"), el("div", { class: "bar" }, chooser("queue", queues, s.queue, (k) => { s.queue = k; s.at = null; Studio.pages.review(root); })),
      counts, buttons, card);
    if (editing) { editBox.focus(); }
  };
  const move = (step) => { s.at = Math.max(0, Math.min(q.items.length - 1, s.at + step)); Studio.pages.review(root); };
  const decide = async (decision) => {
    const reply = decision === "edit" ? document.getElementById("edit-reply").value : undefined;
    try {
      await post(`/api/review/${s.queue}`, { key: item.key, decision, reply });
    } catch (e) { status("not saved: " + e.message); return; }
    status(`saved: ${decision} ${item.key}`);
    if (decision !== "undo") s.at = Math.min(q.items.length - 1, s.at + 1);
    Studio.pages.review(root);
  };
  document.onkeydown = (e) => {
    if (editing) {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); decide("edit"); }
      if (e.key === "Escape") { editing = false; render(); }
      return;
    }
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    const act = { a: () => decide("accept"), r: () => decide("reject"), u: () => decide("undo"), j: () => move(1), k: () => move(-1),
      e: () => { editing = true; render(); } }[e.key];
    if (act) { e.preventDefault(); act(); }
  };
  render();
};
